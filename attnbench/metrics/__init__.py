"""Quality metrics: sampling, FID and friends, the GenEval proxy, fidelity to the teacher.

>>> from attnbench.metrics import SampleSettings, generate, geneval_score, quality_metrics
>>> drawn = generate(model, SampleSettings(num=256, steps=250, cfg_scale=1.5))  # doctest: +SKIP
>>> geneval_score(drawn["images"], drawn["labels"]).overall                     # doctest: +SKIP
>>> ref = load_reference("shapes:1000", image_size=32)                          # doctest: +SKIP
>>> quality_metrics(drawn["images"], ref)["metrics"]["fid"]                     # doctest: +SKIP

``sample.py`` sampling with DiT's protocol (seeded chunks, torchrun, ADM .npz),
``fid.py`` float64 statistics, references and the FID family, ``engines.py``
torch-fidelity / clean-fid and the feature extractors, ``shapes_classifier.py``
the shipped shapes-world extractor and its training, ``geneval.py`` the exact
detector and GenEval's rules, ``fidelity.py`` PSNR / SSIM / ε error,
``quality.py`` the quality stage, ``cli.py`` the ``sample`` and ``eval``
subcommands. The one workaround that lets the real torch-fidelity and clean-fid
import next to a CPU torch is the leaf module :mod:`attnbench.torchvision_compat`
(diffusers needs it too).

Importing this package imports neither torchvision nor the FID libraries.
"""

from .fid import FeatureStats, Reference, frechet_distance, load_reference, quality_metrics
from .fidelity import eps_error, psnr, ssim
from .geneval import Detection, GenEvalResult, detect, geneval_score, satisfies
from .quality import evaluate
from .sample import SampleSettings, chunk_seed, generate, run_sampling, save_npz

__all__ = [
    "Detection",
    "FeatureStats",
    "GenEvalResult",
    "Reference",
    "SampleSettings",
    "chunk_seed",
    "detect",
    "eps_error",
    "evaluate",
    "frechet_distance",
    "generate",
    "geneval_score",
    "load_reference",
    "psnr",
    "quality_metrics",
    "run_sampling",
    "satisfies",
    "save_npz",
    "ssim",
]
