"""Load generation, traces and the simulator (tools; the serving core never imports them)."""
