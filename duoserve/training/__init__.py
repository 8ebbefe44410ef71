"""Training of small MoE language models on a real text corpus (issue 4).

The models exist to give the engine realistic routing: they share the topology
(layers x experts x top-k) of the large models under test, and one small model is
shipped as the built-in default. Modules:

- ``corpus``: the Python 3.11 documentation (reST sources from Debian's
  ``python3.11-doc``) cleaned to plain text, split by document.
- ``tokenizer``: a byte-level BPE tokenizer and its Hugging Face files.
- ``model``: a plain-PyTorch decoder with the math of ``MixtralForCausalLM`` and
  ``Qwen3MoeForCausalLM``.
- ``checkpoint``: Hugging Face export (on-disk names of real checkpoints) and
  resumable training state.
- ``train``: presets and the training loop (CLI).
- ``evaluate``: held-out perplexity, routing statistics and sample generations.
- ``report``: markdown and loss-curve PNGs for docs/models.md.
"""
