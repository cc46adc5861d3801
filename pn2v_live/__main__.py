"""`python -m pn2v_live` is `pn2v-live`."""

from pn2v_live.service.cli import main

main()
