"""Zero-shot segmentation: protocols, dataset readers, sliding-window inference, metrics."""

from segclip.eval.datasets import BENCHMARKS, BenchmarkSpec, get_benchmark, read_samples
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.predict import predict_images
from segclip.eval.protocol import PROTOCOLS, EvalProtocol
from segclip.eval.scoring import BenchmarkResult, evaluate_benchmark
from segclip.eval.segment import Segmenter

__all__ = [
    "BENCHMARKS",
    "PROTOCOLS",
    "BenchmarkResult",
    "BenchmarkSpec",
    "ConfusionMatrix",
    "EvalProtocol",
    "Segmenter",
    "evaluate_benchmark",
    "get_benchmark",
    "predict_images",
    "read_samples",
]
