"""Tools that build and export pipelines into a Tessera model repository. They import tessera; tessera's
serving code never imports them."""
