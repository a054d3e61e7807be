"""The skeleton of every network of the search space: stem, cells, classifier (DESIGN.md §2)."""

import keras
from keras import ops

from hmnas_keras.space.cell import Cell
from hmnas_keras.space.maskable import (
    FLOAT32,
    MaskableBatchNormalization,
    MaskableConv2D,
    MaskableDense,
)
from hmnas_keras.space.operations import BuiltOnCall
from hmnas_keras.space.search_space import SearchSpace


class CellNetwork(BuiltOnCall, keras.Model):
    """Stem (Conv3x3-BN, 3C), `num_cells` cells, global pooling and a Dense classifier.

    The skeleton shared by the supernet and the searched networks: `genotypes`
    maps a cell type to the genotype of its cells (None: full supernet cells);
    `fixed_weights` maps a cell type to the constant op weights [num_edges,
    num_ops] and edge weights [num_edges] its cells use. `Supernet` computes
    them from α and β instead (it overrides `cell_weights()`).

    A searched network may describe each cell on its own instead, in
    `instances` (one dict per cell: "genotype", "used", and with channel masks
    "kept" and "middle", see `Cell`): a cell that nothing downstream reads
    ("used": False) is not built, and `cells` holds None in its place.
    `stem_channels` is the stem's width (default 3C).
    """

    def __init__(
        self,
        search_space: SearchSpace,
        num_classes: int,
        genotypes=None,
        fixed_weights=None,
        instances=None,
        stem_channels: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "Received an invalid value for num_classes, expected an integer >= 2. "
                f"Received: num_classes={num_classes!r}"
            )
        self.search_space = search_space
        self.num_classes = num_classes
        space = search_space
        genotypes = genotypes or {}
        if instances is None:
            instances = [{"genotype": genotypes.get(t)} for t in space.cell_types]
        self.stem_conv = MaskableConv2D(
            stem_channels or 3 * space.channels,
            3,
            padding="same",
            use_bias=False,
            name="stem_conv",
        )
        self.stem_bn = MaskableBatchNormalization(momentum=0.9, epsilon=1e-5, name="stem_bn")
        self.cells = []
        reduction_prev = False
        for index, (cell_type, channels, instance) in enumerate(
            zip(space.cell_types, space.cell_channels, instances, strict=True)
        ):
            reduction = cell_type == "reduce"
            cell = None
            if instance.get("used", True):
                cell = Cell(
                    channels,
                    space.num_nodes,
                    reduction,
                    reduction_prev,
                    space.op_names,
                    genotype=instance.get("genotype"),
                    kept=instance.get("kept"),
                    middle=instance.get("middle"),
                    name=f"cell_{index}",
                )
            self.cells.append(cell)
            reduction_prev = reduction
        self.global_pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
        self.classifier = MaskableDense(num_classes, name="classifier")
        self._fixed_weights = fixed_weights or {}

    def cell_weights(self) -> dict:
        """Per present cell type, (op weights, edge weights) for its cells."""
        return {
            cell_type: (ops.convert_to_tensor(op_w), ops.convert_to_tensor(edge_w))
            for cell_type, (op_w, edge_w) in self._fixed_weights.items()
        }

    def call(self, images, training=None):
        weights = self.cell_weights()
        s0 = s1 = self.stem_bn(self.stem_conv(images), training=training)
        for cell, cell_type in zip(self.cells, self.search_space.cell_types, strict=True):
            if cell is None:  # unused: nothing downstream reads its output
                s0, s1 = s1, None
                continue
            op_weights, edge_weights = weights[cell_type]
            s0, s1 = s1, cell(s0, s1, op_weights, edge_weights, training=training)
        return self.classifier(self.global_pool(s1))

    def kernel_layers(self) -> list:
        """Every layer with a maskable kernel (convolutions and the classifier), in order."""
        layers = [self.stem_conv]
        for cell in self.cells:
            if cell is not None:
                layers += cell.kernel_layers()
        return layers + [self.classifier]
