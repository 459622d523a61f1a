"""Training: run configurations, the shared accelerate loop and checkpoints, pretraining and fine-tuning."""
