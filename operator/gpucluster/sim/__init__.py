"""`gpucluster simulate`: trace replay through the production planner."""
