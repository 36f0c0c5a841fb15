"""The Triton model repository (installed as `sparrow.triton_repo`); `sparrow serve` lays out a runnable copy."""
