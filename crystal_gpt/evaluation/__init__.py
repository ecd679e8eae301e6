"""Evaluation: metrics, fingerprints and reference caches, file readers, the evaluation suite,
crystal structure prediction, the report, and stability (potential, relaxation, hull, S.U.N.).

Submodules are imported on demand: the suite pulls in matminer, stability pulls in CHGNet."""
