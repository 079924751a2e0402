"""Target-matrix selection shared by the optimizer techniques (COSMOS, Fira, SST)."""
