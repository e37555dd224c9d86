"""The demo model's data pipeline: pinned registry sources -> pre-training corpus + bilingual chat data.

    from glmkit.training.data import build_dataset
    summary = build_dataset("data/", tiny=False, seed=0)

See `glmkit.training.data.build` for the output layout and `glmkit.training.data.sources` for the sources and licences.
"""

from glmkit.training.data.sources import SOURCES, Source, SourceError

__all__ = ["SOURCES", "Source", "SourceError", "build_dataset", "main"]


def __getattr__(name: str):
    # Imported lazily so that `python -m glmkit.training.data.build` does not find the module half-imported.
    if name in ("build_dataset", "main"):
        from glmkit.training.data import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
