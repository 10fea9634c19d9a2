"""One-pass streaming training, progressive evaluation, checkpoint / resume and metrics."""
