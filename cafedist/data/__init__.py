"""The data room: raw-format loaders, federated partitioning, the HDF5 store, ``prepare``.

Flow: ``load_dataset`` (one on-disk format -> RawDataset, train+test pooled) ->
``partition`` (proxy split, Dirichlet label skew, per-client test split) -> ``write_store``
(one validated HDF5 file) -> ``Store`` (what the trainer reads, one client at a time).
Nothing here ever downloads anything.
"""

from cafedist.data.base import RawDataset
from cafedist.data.partition import dirichlet_partition, split_proxy, train_test_split_stratified
from cafedist.data.prepare import ensure_store, make_splits, partition_params, prepare_store
from cafedist.data.registry import DATASETS, load_dataset
from cafedist.data.spec import PartitionSpec
from cafedist.data.store import SCHEMA_VERSION, ClientData, Store, write_store

__all__ = [
    "DATASETS", "SCHEMA_VERSION", "ClientData", "PartitionSpec", "RawDataset", "Store", "dirichlet_partition",
    "ensure_store", "load_dataset", "make_splits", "partition_params", "prepare_store",
    "split_proxy", "train_test_split_stratified", "write_store",
]
