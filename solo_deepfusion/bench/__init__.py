"""The benchmark's host-free half: the results schema and the report (no solo-learn needed).

The runs themselves (grid, runner, evaluation) need solo-learn and live in
:mod:`solo_deepfusion.solo.bench`.
"""

BASELINE = "mlp"  # the projector every other head is compared with: solo-learn's own MLP
