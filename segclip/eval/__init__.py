"""Zero-shot segmentation: protocols, dataset readers, sliding-window inference, metrics."""
