"""hwprune: the command line and the settings that glue pruning_core, the API and the workers together."""
