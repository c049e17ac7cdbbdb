"""The data pipeline's names in one place, for code written against the former one-module ``data``.

The rows pass through the stages once, in this order, each one module (:func:`.build.load_examples` calls them
top to bottom):

==============  ===================  ========================================================================
stage           module               what it does
==============  ===================  ========================================================================
read, check     :mod:`.rows`         a dataset's rows (files, hub sets, generated data); columns, nulls, sizes
render          :mod:`.chat`         conversations and preference pairs through the chat template
tokenize        :mod:`.tokenize`     token ids and labels by ``data.format`` (batched, cached ``map``)
pack            :mod:`.pack`         overlong examples, text blocks, packed chat rows; fit to the model
plan, collate   :mod:`.batches`      the batch order of every process; padded / padding-free tensors
==============  ===================  ========================================================================

:mod:`.examples` holds what the stages hand each other (``Tokenized``, ``Examples``); :mod:`.demo_data` the
built-in byte tokenizer and the generated ``topics`` set.
"""

from __future__ import annotations

from .batches import (
                      GROUP_BATCHES,
                      BatchPlan,
                      collate,
                      collate_pairs,
                      count_tokens,
                      example_lengths,
                      loss_units,
                      pack_rows,
)
from .demo_data import GENERATED, byte_tokenizer, topics
from .examples import IGNORE_INDEX, MAP_BATCH, Examples, Tokenized, is_eval_key
from .pack import check_lengths, check_packed_attention, finish, packing_report, packs
from .rows import (
                      GENERATED_PREFIX,
                      LOCAL_EXTENSIONS,
                      MAX_VALUE_BYTES,
                      check_columns,
                      check_rows,
                      check_utf8,
                      read_rows,
                      required_columns,
)
from .tokenize import CACHE_VERSION, encode, tokenize, tokenizer_hash

__all__ = ["CACHE_VERSION", "GENERATED", "GENERATED_PREFIX", "GROUP_BATCHES", "IGNORE_INDEX", "LOCAL_EXTENSIONS",
           "MAP_BATCH", "MAX_VALUE_BYTES", "BatchPlan", "Examples", "Tokenized", "byte_tokenizer", "check_columns",
           "check_lengths", "check_packed_attention", "check_rows", "check_utf8", "collate", "collate_pairs",
           "count_tokens", "encode", "example_lengths", "finish", "is_eval_key", "loss_units", "pack_rows",
           "packing_report", "packs", "read_rows", "required_columns", "tokenize", "tokenizer_hash", "topics"]
