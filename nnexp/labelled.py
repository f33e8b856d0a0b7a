"""Labelled tensors: a torch tensor with named axes and labels along them.

Results come back as `LabelledTensor`s so that code reads `effect.sel(layer=12)`
rather than remembering that axis 0 is the layer. Axis names used by nnexp:
"example", "layer", "position", "head".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LabelledTensor:
    values: torch.Tensor
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        if self.values.dim() != len(self.dims):
            raise ValueError(f"{self.values.dim()}-d tensor given {len(self.dims)} axis names {self.dims}")
        for dim, labels in self.coords.items():
            if dim not in self.dims:
                raise ValueError(f"labels given for {dim!r}, which is not an axis of {self.dims}")
            size = self.values.shape[self.dims.index(dim)]
            if len(labels) != size:
                raise ValueError(f"axis {dim!r} has {size} entries but {len(labels)} labels")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise KeyError(f"no axis {dim!r}; axes are {self.dims}")
        return self.dims.index(dim)

    def labels(self, dim: str) -> list:
        return list(self.coords.get(dim, range(self.values.shape[self.axis(dim)])))

    def sel(self, **selection) -> LabelledTensor:
        """Select by label along named axes, e.g. `t.sel(layer=3)` drops the layer axis."""
        values, dims, coords = self.values, list(self.dims), dict(self.coords)
        for dim, label in selection.items():
            labels = self.labels(dim)
            if label not in labels:
                raise KeyError(f"{label!r} is not a label of axis {dim!r}: {labels}")
            values = values.select(dims.index(dim), labels.index(label))
            dims.remove(dim)
            coords.pop(dim, None)
        return LabelledTensor(values, tuple(dims), coords)

    def item(self) -> float:
        """The single value of a tensor with every axis selected away."""
        return self.values.item()

    def tolist(self) -> list | float:
        return self.values.tolist()

    def mean(self, dim: str) -> LabelledTensor:
        axis = self.axis(dim)
        return LabelledTensor(
            self.values.mean(axis),
            self.dims[:axis] + self.dims[axis + 1 :],
            {k: v for k, v in self.coords.items() if k != dim},
        )

    def __repr__(self) -> str:
        axes = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        return f"LabelledTensor({axes})"

    # -- other libraries and notebooks ------------------------------------------------

    def to_pandas(self, name: str = "value"):
        """A pandas Series indexed by every axis's labels (a MultiIndex for two or more
        axes; `.unstack()` makes a table of a 2-d one)."""
        import pandas as pd

        values = self.values.detach().cpu().double().numpy()
        if not self.dims:
            return pd.Series([values.item()], name=name)
        index = pd.MultiIndex.from_product([self.labels(d) for d in self.dims], names=list(self.dims))
        series = pd.Series(values.reshape(-1), index=index, name=name)
        return series if len(self.dims) > 1 else series.set_axis(pd.Index(self.labels(self.dims[0]), name=self.dims[0]))

    def to_xarray(self, name: str = "value"):
        """An xarray DataArray with the same axes and labels (needs `pip install xarray`)."""
        try:
            import xarray
        except ImportError:
            from .errors import ConfigError

            raise ConfigError("to_xarray needs the xarray package: pip install xarray (or use to_pandas())") from None
        return xarray.DataArray(self.values.detach().cpu().numpy(), dims=self.dims,
                                coords={d: self.labels(d) for d in self.dims}, name=name)

    def _repr_html_(self) -> str:
        """Jupyter's view: the axes, and the values as a table when they are small."""
        from html import escape

        axes = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        head = f"<p><b>LabelledTensor</b>({escape(axes)})</p>"
        if self.values.numel() > 2000 or len(self.dims) > 2:
            return head + "<p>" + escape(", ".join(f"{d}: {_labels_text(self.labels(d))}" for d in self.dims)) + "</p>"
        import pandas as pd

        values = self.values.detach().cpu().double().numpy()
        if len(self.dims) == 2:  # rows and columns in label order (unstack would sort them)
            table = pd.DataFrame(values, index=pd.Index(self.labels(self.dims[0]), name=self.dims[0]),
                                 columns=pd.Index(self.labels(self.dims[1]), name=self.dims[1]))
        else:
            table = self.to_pandas().to_frame()
        return head + table.to_html(float_format=lambda v: f"{v:.4g}", max_rows=40, max_cols=40)


def _labels_text(labels: list, shown: int = 6) -> str:
    text = ", ".join(map(str, labels[:shown]))
    return f"[{text}{', ...' if len(labels) > shown else ''}] ({len(labels)})"
