"""biaslens.unlearn: PCGU, task-vector negation, δ-offset unlearning and masked-span ascent, each
choosing its strength on the validation split under the same bounds (:mod:`biaslens.unlearn.select`)."""

# PCGU and its pair sources (light: these modules import torch only inside functions). The PCGU
# engine is the module ``biaslens.unlearn.partitioned`` (partitioned contrastive gradient unlearning).
from biaslens.unlearn.distributed import pcgu_fsdp
from biaslens.unlearn.pairs import (ContrastPair, crows_pairs, jsonl_pairs, load_pairs, organism_pairs,
                                    stereoset_pairs, winogender_pairs)
from biaslens.unlearn.partitioned import pcgu

# Task-vector negation, δ-offset unlearning, masked-span ascent and their data (torch imported lazily).
from biaslens.unlearn.common import KeepTerm
from biaslens.unlearn.data import SpanText, organism_forget, organism_retain, read_span_jsonl
from biaslens.unlearn.masked_ascent import masked_span_ascent
from biaslens.unlearn.offset import OffsetModel, export_offset, load_offset, offset_unlearn
from biaslens.unlearn.runs import run_data, run_method, run_validation
from biaslens.unlearn.select import Bounds, Validation
from biaslens.unlearn.task_vector import task_vector_negation

__all__ = ["pcgu", "pcgu_fsdp", "ContrastPair", "crows_pairs", "jsonl_pairs", "load_pairs", "organism_pairs",
           "stereoset_pairs", "winogender_pairs", "KeepTerm", "SpanText", "organism_forget", "organism_retain",
           "read_span_jsonl", "masked_span_ascent", "OffsetModel", "export_offset", "load_offset",
           "offset_unlearn", "Bounds", "Validation", "task_vector_negation", "run_data", "run_validation",
           "run_method"]
