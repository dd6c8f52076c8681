"""The tiny pipeline run the integration tests share: seconds per stage on 2 CPU cores."""

TINY_RUN = [
    "demo.train_images=48",
    "ingest.samples_per_shard=16",
    "runtime.ingest_processes=1",
    "train.steps=3",
    "train.global_batch_size=8",
    "runtime.log_every=1",
    "demo.benchmark_images=4",
    "demo.image_size=96",
    "ingest.image_size=96",
    "eval.benchmarks=[demo]",
]
