"""The demo model's data pipeline: pinned registry sources -> pre-training corpus + bilingual chat data.

    from glmkit.data import build_dataset
    summary = build_dataset("data/", tiny=False, seed=0)

See `glmkit.data.build` for the output layout and `glmkit.data.sources` for the sources and licences.
"""

from glmkit.data.sources import SOURCES, Source, SourceError

__all__ = ["SOURCES", "Source", "SourceError", "build_dataset", "main"]


def __getattr__(name: str):
    # Imported lazily so that `python -m glmkit.data.build` does not find the module half-imported.
    if name in ("build_dataset", "main"):
        from glmkit.data import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
