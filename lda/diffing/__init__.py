"""The diffing toolkit's methods on a before/after pair, as streaming passes.

`mine.LogitDiffPass`: `diff_mining` token statistics, orderings and NMF topics, KL between the
pair per position, windowed log-likelihood ratios, in one teacher-forced pass per batch.
"""
