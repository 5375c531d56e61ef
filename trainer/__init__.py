"""Training loop: build → step → log → checkpoint; data pipeline; lr schedule; metrics; EMA."""
