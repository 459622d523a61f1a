"""The objective and its models: corruption (masking), targets, the MPP model over timm encoders, weight files."""
