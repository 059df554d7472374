"""Results: the analysis of a study's trial records, the ordering test and the report. Imports
core only (no torch, no Ray): `stageflow report` reads records without starting anything."""
