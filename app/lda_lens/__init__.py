"""The LDA lens: `/generate_lda`, `/generate` and `/tokenizer_compatibility`."""
