"""Data pipelines on grain: packed text, chat with answer-only loss, text classification."""

from lorax_ft.data.batching import BatchIterator, batch_dataset, padding_example
from lorax_ft.data.chat import CHAT_FORMATS, chatml, encode_chat, plain, to_messages
from lorax_ft.data.classification import encode_classification, label_vocabulary
from lorax_ft.data.errors import DataError, DataFileNotFoundError
from lorax_ft.data.named import NAMED_DATASETS, load_named
from lorax_ft.data.pipeline import (
    check_data_config,
    default_data_config,
    label_ids,
    load_records,
    make_pipeline,
)
from lorax_ft.data.splits import split_records, split_text_tail
from lorax_ft.data.text import pack_documents, text_example

__all__ = [
    "CHAT_FORMATS",
    "NAMED_DATASETS",
    "BatchIterator",
    "DataError",
    "DataFileNotFoundError",
    "batch_dataset",
    "chatml",
    "check_data_config",
    "default_data_config",
    "encode_chat",
    "encode_classification",
    "label_ids",
    "label_vocabulary",
    "load_named",
    "load_records",
    "make_pipeline",
    "pack_documents",
    "padding_example",
    "plain",
    "split_records",
    "split_text_tail",
    "text_example",
    "to_messages",
]
