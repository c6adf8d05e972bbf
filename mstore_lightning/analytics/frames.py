"""``to_pandas()`` for analytics results; pandas is imported only when asked for."""

from __future__ import annotations

from typing import Any


def frame(columns: dict[str, Any], **kwargs: Any) -> Any:
    """A ``pandas.DataFrame`` of ``columns``, or a clear error when pandas is missing."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("to_pandas() needs pandas: pip install 'mstore-lightning[analytics]'.") from exc
    return pd.DataFrame(columns, **kwargs)
