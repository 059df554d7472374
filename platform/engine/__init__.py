"""The study engine: a study's trials on Ray Tune, each trial's stages through the actors, the
prefix cache and the MLflow records. Imports core, kernels, actors and results; never commands."""
