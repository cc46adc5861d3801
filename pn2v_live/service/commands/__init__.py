"""One module per group of `pn2v-live` sub-commands; each registers on `cli.app`."""
