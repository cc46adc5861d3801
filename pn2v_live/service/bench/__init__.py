"""`pn2v-live bench`: timings and peak memory of the algorithm core and the pipeline."""
