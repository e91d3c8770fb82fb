"""Metric names shared by training, evaluation, search, tracking and DVC: typed once, here.

Every figure that leaves a run (MLflow metrics, Tune reports, DVC metrics files, registry tags)
uses these names, so a chart in the MLflow UI, an Optuna objective and `dvc metrics show` agree.
"""

MIOU = "miou"
PIXEL_ACCURACY = "pixel_accuracy"
GFLOPS_MEAN = "gflops_mean"
GFLOPS_MAX = "gflops_max"
GFLOPS_MIN = "gflops_min"
GFLOPS_P50 = "gflops_p50"
GFLOPS_P90 = "gflops_p90"
EXPECTED_GFLOPS = "expected_gflops"
# Where the budget stands: the expected cost over C_all (what the budget loss pulls towards μ),
# mean over the last logged steps of a training.
EXPECTED_COST_RATIO = "expected_cost_ratio"
# The real GFLOPs per image (at the cost resolution) with every gate closed (the stem, decoder,
# head and gates every image pays: no budget goes below it) and with every path open.
GFLOPS_FLOOR = "gflops_floor"
GFLOPS_ALL_OPEN = "gflops_all_open"
LATENCY_MS = "latency_ms"
# Measured latency per image (platform/evaluate/latency.py: each image's median over interleaved
# repeats), over the images: median, 90th percentile and mean, in ms.
LATENCY_P50_MS = "latency_p50_ms"
LATENCY_P90_MS = "latency_p90_ms"
LATENCY_MEAN_MS = "latency_mean_ms"
# Whether another job disturbed a timing, and the two figures that tell
# (platform/evaluate/disturbance.py): CPU cores busy elsewhere, calibration drift.
LATENCY_DISTURBED = "latency_disturbed"
LATENCY_BUSY_ELSEWHERE = "latency_busy_elsewhere"
LATENCY_CALIBRATION_DRIFT = "latency_calibration_drift"
LOSS_SEGMENTATION = "loss_seg"
LOSS_BUDGET = "loss_budget"
LEARNING_RATE = "lr"

# The two objectives of the budget search: (name, direction).
SEARCH_OBJECTIVES = ((MIOU, "max"), (GFLOPS_MEAN, "min"))
