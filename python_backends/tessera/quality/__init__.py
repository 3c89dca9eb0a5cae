"""Quality harness: procedural captioned shapes, self-trained reference models, an evaluator CNN and
offline metrics (../shared/reference/quality.md). A tool package: the serving core never imports it."""
