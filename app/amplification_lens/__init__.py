"""The amplification lens: `/adapters`, `/amplification/*` and the toolkit's compile route."""
