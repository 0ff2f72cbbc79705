"""all-MiniLM-L6-v2, a 6-layer BERT sentence encoder, as Flax Linen modules.

The network is BERT (Devlin et al., 2019) at MiniLM's size (hidden 384, 12
heads, feed-forward 1536, 6 layers, uncased WordPiece vocabulary of 30,522,
512 positions), the encoder of sentence-transformers' all-MiniLM-L6-v2:
embeddings (word + position + token type, then LayerNorm), then post-LN
transformer layers (self-attention, add, LayerNorm; feed-forward with the
exact erf GELU, add, LayerNorm), LayerNorm epsilon 1e-12 throughout, and
dropout 0.1 on the embeddings, the attention probabilities and each
sub-layer's output when not deterministic, as in BERT fine-tuning.

A sentence's embedding is the mean of its tokens' last hidden states over the
non-padding tokens (:func:`mean_pool`), L2-normalised (:func:`l2_normalize`).
:class:`MiniLMClassifier` puts a linear classifier on the mean-pooled states.
Both modules lay their parameters out in network order, top-level::

  embeddings/{word, position, token_type}/embedding, embeddings/norm
  layer_0 ... layer_5/
    attention/{query, key, value, out}/{kernel, bias}, attention_norm,
    intermediate/{kernel, bias}, output/{kernel, bias}, output_norm
  classifier/{kernel, bias}                       MiniLMClassifier only

so that ``multirate_optax.fast_by_depth(1)`` picks the classifier and
``fast_by_depth(2)`` the last layer and the classifier.
:mod:`experiments.models.minilm_weights` fills them from the pretrained file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Sizes of the encoder; the defaults are all-MiniLM-L6-v2's ``config.json``.

  Attributes:
    vocab_size: WordPiece vocabulary.
    max_positions: longest input, in tokens (learned position embeddings).
    type_vocab_size: token types (segments A and B).
    hidden_size: width of every layer's input and output.
    num_layers: transformer layers.
    num_heads: attention heads; ``hidden_size`` must be a multiple.
    intermediate_size: width of the feed-forward layer.
    layer_norm_epsilon: of every LayerNorm.
    dropout_rate: BERT's ``hidden_dropout_prob`` and
      ``attention_probs_dropout_prob`` (equal in this model).
  """
  vocab_size: int = 30522
  max_positions: int = 512
  type_vocab_size: int = 2
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  layer_norm_epsilon: float = 1e-12
  dropout_rate: float = 0.1

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of num_heads "
          f"{self.num_heads}.")


def _layer_norm(config: MiniLMConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it: with epsilon 1e-12 nothing
  # hides the cancellation of Flax's default E[x^2] - E[x]^2.
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon,
                      use_fast_variance=False, name=name)


class _Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    positions = jnp.arange(input_ids.shape[-1])
    x = (nn.Embed(config.vocab_size, config.hidden_size, name="word")(
        input_ids)
         + nn.Embed(config.max_positions, config.hidden_size,
                    name="position")(positions)
         + nn.Embed(config.type_vocab_size, config.hidden_size,
                    name="token_type")(token_type_ids))
    x = _layer_norm(config, "norm")(x)
    return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention and its output projection."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    head_size = config.hidden_size // config.num_heads
    *batch, length, _ = x.shape

    def heads(name: str) -> jax.Array:
      projected = nn.Dense(config.hidden_size, name=name)(x)
      return projected.reshape(*batch, length, config.num_heads, head_size)

    query, key, value = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(
        jnp.asarray(head_size, x.dtype))
    probabilities = jax.nn.softmax(scores + bias, axis=-1)
    probabilities = nn.Dropout(config.dropout_rate)(
        probabilities, deterministic=deterministic)
    attended = jnp.einsum("...hqk,...khd->...qhd", probabilities, value)
    return nn.Dense(config.hidden_size, name="out")(
        attended.reshape(*batch, length, config.hidden_size))


class _TransformerLayer(nn.Module):
  """One post-LN BERT layer: attention, add & norm, feed-forward, add & norm."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array,
               deterministic: bool) -> jax.Array:
    config = self.config
    dropout = nn.Dropout(config.dropout_rate)
    attended = _SelfAttention(config, name="attention")(x, bias, deterministic)
    x = _layer_norm(config, "attention_norm")(
        x + dropout(attended, deterministic=deterministic))
    hidden = nn.gelu(nn.Dense(config.intermediate_size, name="intermediate")(x),
                     approximate=False)  # BERT's "gelu" is the erf form.
    hidden = nn.Dense(config.hidden_size, name="output")(hidden)
    return _layer_norm(config, "output_norm")(
        x + dropout(hidden, deterministic=deterministic))


def _check_inputs(input_ids: jax.Array, attention_mask: jax.Array,
                  config: MiniLMConfig) -> None:
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(
        "input_ids and attention_mask must both have shape (batch, length), "
        f"got {input_ids.shape} and {attention_mask.shape}.")
  if input_ids.shape[1] > config.max_positions:
    raise ValueError(
        f"inputs of {input_ids.shape[1]} tokens are longer than the "
        f"{config.max_positions} positions of the model; truncate them.")


class MiniLM(nn.Module):
  """The encoder: token ids to last hidden states.

  Attributes:
    config: the sizes; the default is all-MiniLM-L6-v2.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments.models.minilm import MiniLM
    >>> ids = jnp.array([[101, 7592, 102, 0]])   # [CLS] hello [SEP] [PAD]
    >>> mask = jnp.array([[1, 1, 1, 0]])
    >>> params = jax.eval_shape(MiniLM().init, jax.random.key(0), ids, mask)
    >>> ' '.join(params['params'])
    'embeddings layer_0 layer_1 layer_2 layer_3 layer_4 layer_5'
    >>> jax.eval_shape(MiniLM().apply, params, ids, mask).shape
    (1, 4, 384)
  """
  config: MiniLMConfig = MiniLMConfig()

  def setup(self):
    self.embeddings = _Embeddings(self.config)
    # A list attribute names its modules layer_0, layer_1, ...
    self.layer = [_TransformerLayer(self.config)
                  for _ in range(self.config.num_layers)]

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
             token_type_ids: jax.Array | None = None,
             deterministic: bool = True) -> jax.Array:
    """Last hidden states; see :meth:`__call__`."""
    _check_inputs(input_ids, attention_mask, self.config)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    # Padding keys get the lowest float, as in BERT: after the softmax their
    # weight is exactly zero for every query.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(x.dtype).min).astype(x.dtype)
    for layer in self.layer:
      x = layer(x, bias, deterministic)
    return x

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Last hidden states of a batch of token sequences.

    Args:
      input_ids: int array of shape (batch, length), WordPiece ids.
      attention_mask: shape (batch, length), 1 for tokens, 0 for padding;
        no token attends to padding.
      token_type_ids: segment ids of the same shape; zeros (one segment)
        when None.
      deterministic: turns dropout off. When False, ``apply`` needs
        ``rngs={'dropout': key}``.

    Returns:
      float32 array of shape (batch, length, hidden_size); the states of
      padding positions are computed but meaningless.
    """
    return self.encode(input_ids, attention_mask, token_type_ids,
                       deterministic)


def _classifier(num_classes: int) -> nn.Dense:
  # Shared by the module and init_minilm_classifier, so that a fresh head
  # on pretrained weights is initialised exactly like the module's own.
  return nn.Dense(num_classes)


def init_minilm_classifier(num_classes: int, rng: jax.Array,
                    config: MiniLMConfig = MiniLMConfig()) -> dict[str, Any]:
  """Fresh parameters of :class:`MiniLMClassifier`'s ``classifier``.

  Flax's Dense initialisation: LeCun-normal kernel, zero bias.

  Example:
    >>> import jax
    >>> from experiments.models.minilm import init_minilm_classifier
    >>> init_minilm_classifier(2, jax.random.key(0))['kernel'].shape
    (384, 2)
  """
  return _classifier(num_classes).init(
      rng, jnp.zeros((1, config.hidden_size), jnp.float32))["params"]


class MiniLMClassifier(MiniLM):
  """The encoder, mean pooling, dropout and a linear classifier.

  Attributes:
    config: the encoder's sizes.
    num_classes: outputs of the classifier.
    classifier_dropout_rate: dropout on the pooled features (BERT's
      fine-tuning recipe puts 0.1 there too).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments.models.minilm import MiniLMClassifier
    >>> model = MiniLMClassifier(num_classes=3)
    >>> ids, mask = jnp.ones((8, 16), jnp.int32), jnp.ones((8, 16), jnp.int32)
    >>> # Shapes only here; load_pretrained_minilm_classifier gives weights.
    >>> params = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    >>> params['params']['classifier']['kernel'].shape
    (384, 3)
    >>> # Fine-tuning: dropout on.
    >>> train = lambda p, key: model.apply(
    ...     p, ids, mask, deterministic=False, rngs={'dropout': key})
    >>> jax.eval_shape(train, params, jax.random.key(1)).shape
    (8, 3)
  """
  num_classes: int = 2
  classifier_dropout_rate: float = 0.1

  def setup(self):
    super().setup()
    self.dropout = nn.Dropout(self.classifier_dropout_rate)
    self.classifier = _classifier(self.num_classes)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Class logits, shape (batch, num_classes); arguments as for MiniLM."""
    hidden = self.encode(input_ids, attention_mask, token_type_ids,
                         deterministic)
    pooled = self.dropout(mean_pool(hidden, attention_mask),
                          deterministic=deterministic)
    return self.classifier(pooled)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the hidden states over the non-padding tokens.

  sentence-transformers' mean pooling: padding positions are left out, and a
  sequence without any token gives zeros rather than NaN.

  Args:
    hidden: shape (batch, length, features).
    attention_mask: shape (batch, length), 1 for tokens, 0 for padding.

  Returns:
    Shape (batch, features).

  Example:
    >>> import jax.numpy as jnp
    >>> from experiments.models.minilm import mean_pool
    >>> hidden = jnp.array([[[1.0], [3.0], [100.0]]])
    >>> mean_pool(hidden, jnp.array([[1, 1, 0]])).tolist()
    [[2.0]]
  """
  mask = attention_mask.astype(hidden.dtype)[..., None]
  count = jnp.maximum(mask.sum(axis=-2), 1e-9)
  return (hidden * mask).sum(axis=-2) / count


def l2_normalize(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
  """Rows scaled to unit Euclidean norm (norms below ``epsilon`` count as it).

  Example:
    >>> import jax.numpy as jnp
    >>> from experiments.models.minilm import l2_normalize
    >>> l2_normalize(jnp.array([[3.0, 4.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
  """
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, epsilon)
