"""LoRA on an ``nn.Embedding`` (GPT-2's ``wte``), as PEFT 0.21's ``lora.Embedding`` computes it.

``A`` is (num_embeddings, r) and ``B`` (r, dim), so the update of the (num_embeddings, dim) table is
``s A B`` and a token's row of it is ``s * A[id] @ B``:

    y = base(ids) + s * embedding(ids, A) @ B

- The lookup of ``A`` uses the base layer's ``padding_idx``, ``max_norm``, ``norm_type``,
  ``scale_grad_by_freq`` and ``sparse``, as PEFT's ``_embed`` does.
- There is no dropout: PEFT never applies ``lora_dropout`` on embeddings, so ``dropout`` is accepted
  (one setting for all modules) and ignored here too.
- A base with an ``embed_scale`` (scaled word embeddings) scales the update too, as PEFT does.
- PEFT saves ``lora_embedding_A = A.T`` (r, num_embeddings) and ``lora_embedding_B = B.T`` (dim, r).
- Init (``lora_torch.initialize``): A = 0 and B ~ N(0, 1) for ``True`` and ``"gaussian"``, both
  ~ N(0, 1) for ``False``.

GPT-2 ties ``wte`` to ``lm_head`` (one Parameter). Unmerged, only the input lookup is adapted; the
head keeps using the base weight. ``merge_lora_weights`` writes the merged table into that shared
Parameter, so the head follows and merged logits differ from unmerged ones, as with PEFT's
``merge_and_unload``; it logs a warning saying so.

>>> import torch
>>> wrapped = EmbeddingWithLoRA(nn.Embedding(10, 4), rank=2)
>>> tuple(wrapped.lora.lora_A.shape), tuple(wrapped.lora.lora_B.shape), wrapped.lora.lora_A.abs().sum().item()
((10, 2), (2, 4), 0.0)
>>> ids = torch.tensor([[1, 2, 3]])
>>> torch.equal(wrapped(ids), wrapped.base_layer(ids))  # A = 0: a fresh adapter is the identity
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_format.adapter_dir import DEFAULT_ADAPTER
from lora_torch.initialize import InitLoraWeights, init_embedding_branch
from lora_torch.layers import LoRALayer, LoRAWrapper

__all__ = ["EmbeddingLoRALayer", "EmbeddingWithLoRA"]


class EmbeddingLoRALayer(LoRALayer):
    """The low-rank branch of an embedding: ``forward(ids) = embedding(ids, A) @ B * scaling``.

    Args:
        num_embeddings: rows of the table (the vocabulary size).
        embedding_dim: width of each row.
        rank: the rank ``r``.
        lora_alpha: ``alpha``; scaling ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` (both: A = 0, B ~ N(0, 1)) or ``False`` (both ~ N(0, 1)).
        device: where to create the parameters.
        dtype: parameter dtype.

    >>> branch = EmbeddingLoRALayer(5, 3, rank=2, init_lora_weights=False)
    >>> tuple(branch(torch.tensor([0, 4])).shape), branch.dropout_p
    ((2, 3), 0.0)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, rank, lora_alpha, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights, device=device, dtype=dtype)

    def reset_lora_parameters(self, init_lora_weights: InitLoraWeights = True) -> None:
        init_embedding_branch(self.lora_A, self.lora_B, init_lora_weights)

    def forward(self, ids: torch.Tensor, **embedding_options) -> torch.Tensor:
        """``embedding(ids, A, **embedding_options) @ B * scaling``; the options are ``F.embedding``'s."""
        return (F.embedding(ids, self.lora_A, **embedding_options) @ self.lora_B) * self.scaling


class EmbeddingWithLoRA(LoRAWrapper):
    """An ``nn.Embedding`` (weight (num_embeddings, dim)) with a LoRA branch; the embedding is frozen.

    Args:
        embedding: the layer to adapt; kept as ``base_layer``.
        rank: LoRA rank.
        lora_alpha: LoRA alpha.
        dropout: accepted and ignored: PEFT applies no LoRA dropout to embeddings.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` or ``False``, as in ``EmbeddingLoRALayer``.
        adapter_name: the name of this first adapter (``"default"``, as PEFT's).

    >>> wrapped = EmbeddingWithLoRA(nn.Embedding(7, 3), rank=2, lora_alpha=4.0)
    >>> wrapped.in_features, wrapped.out_features, tuple(wrapped.delta_weight().shape)
    (7, 3, (7, 3))
    """

    branch_type = EmbeddingLoRALayer
    lora: EmbeddingLoRALayer

    def __init__(
        self,
        embedding: nn.Embedding,
        rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"EmbeddingWithLoRA wraps torch.nn.Embedding, got {type(embedding).__name__}; use "
                            "LinearWithLoRA or Conv1DWithLoRA for linear layers.")
        del dropout  # PEFT's lora.Embedding keeps a dropout module it never calls
        num_embeddings, embedding_dim = embedding.weight.shape
        lora = EmbeddingLoRALayer(num_embeddings, embedding_dim, rank, lora_alpha, use_rslora=use_rslora,
                                  init_lora_weights=init_lora_weights, device=embedding.weight.device,
                                  dtype=embedding.weight.dtype)
        super().__init__(embedding, num_embeddings, embedding_dim, lora, adapter_name)

    def new_branch(self, **lora_kwargs) -> EmbeddingLoRALayer:
        lora_kwargs.pop("dropout", None)  # accepted and ignored, as above
        return super().new_branch(**lora_kwargs)

    def adapter_output(self, lora: LoRALayer, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        update = lora(ids, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                      scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        embed_scale = getattr(base, "embed_scale", None)  # scaled word embeddings scale the update too
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
        return update
