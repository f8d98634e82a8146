"""Typed config sections for the input side: where the data is (`data`) and what its columns mean
(`features`). Every field has a docstring; `config` loads them from TOML and calls `validate()`.

The allowed names live here, next to their fields, and the code that implements them dispatches on
these same constants (`pipeline.ids` on ID_MAPPINGS, `embeddings.tables` on POOLINGS, the planner on
BAD_FILE_POLICIES), so a new name cannot be accepted here and fall through there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.derived import length_source, lookup_source
from schema import ConfigError, check_one_of, check_range

ID_MAPPINGS = ("hash", "modulo", "raw", "vocab")
"""`features.sparse[i].id_mapping`: how raw ids reach [0, vocab_size) (see SparseFeature.id_mapping)."""
ID_DTYPES = ("int64", "string")
"""`features.sparse[i].dtype`: the column's type."""
POOLINGS = ("sum", "mean", "target_attention")
"""`features.sparse[i].pooling`: how a bag of ids becomes one vector ('' picks by max_len)."""
BAD_FILE_POLICIES = ("error", "skip")
"""`data.on_bad_file`."""
DENSE_TRANSFORMS = ("auto", "standardize", "log1p", "clip", "bucketize", "none")
"""`features.dense_transform` / `dense_transforms`: how a dense feature reaches the model (see
`pipeline.dense_prep`, which turns each into the model's transform parameters)."""


@dataclass
class SparseFeature:
    """One categorical feature: a Parquet column of int64 ids (or strings, hashed to int64), or of
    list<int64> when `max_len > 1` (a behaviour sequence, genres)."""

    name: str = ""
    """Parquet column name; also the KeyedJaggedTensor key."""
    group: str = "item"
    """Semantic group (one of `features.groups`); tokenization concatenates groups in that order."""
    vocab_size: int | str = 100_000
    """Rows of this feature's embedding table; ids are mapped into [0, vocab_size). With id_mapping =
    'vocab': "auto" sizes the table from the vocabulary (oov_buckets + the ids kept), a number caps it
    (the most frequent vocab_size - oov_buckets ids are kept)."""
    dim: int = 16
    """Embedding width."""
    max_len: int = 1
    """1 for a scalar id column; > 1 for a list column, truncated to its last `max_len` ids."""
    table: str = ""
    """Embedding table name; features naming the same table share it (same vocab_size and dim).
    Empty: a table of its own, named after the feature."""
    pooling: str = ""
    """'sum', 'mean' or 'target_attention'; empty picks 'sum' for scalar features and 'mean' for lists.
    'target_attention' (lists only, with `target`): DIN-style attention of the history against the
    candidate, softmax over the real positions of <e(h_j), e(target)> / sqrt(dim), then the weighted sum
    of the e(h_j) (no parameters; an empty history gives zeros; `embeddings.attention`)."""
    target: str = ""
    """pooling = 'target_attention': the scalar feature (max_len 1, the same dim, usually the same table)
    whose embedding is the query, e.g. the candidate item id; empty otherwise."""
    id_mapping: str = "hash"
    """'hash': every id goes through a stable 64-bit mix, modulo vocab_size. 'modulo': ids already in
    range are kept, others are hashed into range (and counted). 'raw': ids passed unchanged, only for
    managed-collision tables (embeddings.managed_collision), which remap any id themselves; on a plain
    table FBGEMM would send out-of-range ids to row 0, so the config refuses it. 'vocab': a vocabulary
    counted on the training rows (`pipeline.vocab`): ids seen at least min_count times get their own
    row, rarer and unseen ids (a new user or item) share the oov_buckets OOV rows, which the rare ids
    train, so a cold-start id gets a learned "new id" embedding instead of a random hashed row. The
    vocabulary is saved in the run directory, every checkpoint and the export artifact."""
    min_count: int = 2
    """id_mapping = 'vocab': ids with fewer occurrences in the training rows map to an OOV row."""
    oov_buckets: int = 1
    """id_mapping = 'vocab': OOV rows at the start of the table (an OOV id goes to row mix64(id) mod
    oov_buckets; 1 = one shared cold-start row)."""
    oov_dropout: float = 0.0
    """id_mapping = 'vocab': in training (never in evaluation or serving) each id is sent to its OOV row
    with this probability, deterministically per (seed, epoch, rank, batch), so the OOV row learns the
    "new id" embedding from all kinds of rows, not only from the rare ids, and the model learns to
    predict from attributes and history when the id is unknown: what a time-ordered test period asks for
    its new users and items."""
    l2: float = -1.0
    """L2 on this feature's looked-up embeddings (l2 / 2 x the squared norm of its pooled embedding, mean
    over the batch's rows); negative: the default, embeddings.vocab_l2 for id_mapping = 'vocab' features
    (id features, which overfit first) and embeddings.l2 for the others."""
    dtype: str = "int64"
    """'int64' or 'string' (strings are hashed to int64 first)."""

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def pooling_mode(self) -> str:
        return self.pooling or ("sum" if self.max_len == 1 else "mean")

    def validate(self, key: str, groups: list[str]) -> None:
        """Check this feature's own fields; `key` is its config path (features.sparse[i])."""
        if not self.name:
            raise ConfigError(f"config key '{key}.name' is empty")
        if self.group not in groups:
            raise ConfigError(f"config key '{key}.group' = {self.group!r} is not in features.groups {groups}")
        for name in ("dim", "max_len", "min_count", "oov_buckets"):
            check_range(getattr(self, name), f"{key}.{name}", min=1)
        if self.vocab_size == "auto":
            if self.id_mapping != "vocab":
                raise ConfigError(
                    f'config key \'{key}.vocab_size\' = "auto" needs id_mapping = "vocab" (a vocabulary from the '
                    f"data), got id_mapping = {self.id_mapping!r}"
                )
        elif isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ConfigError(
                f"config key '{key}.vocab_size': expected an integer or \"auto\", got {self.vocab_size!r}"
            )
        else:
            check_range(self.vocab_size, f"{key}.vocab_size", min=1)
            if self.id_mapping == "vocab" and self.vocab_size <= self.oov_buckets:
                raise ConfigError(
                    f"config key '{key}.vocab_size' = {self.vocab_size} leaves no row beyond the {self.oov_buckets} "
                    "OOV rows (oov_buckets)"
                )
        check_range(self.oov_dropout, f"{key}.oov_dropout", min=0.0, max=1.0, max_open=True)
        if self.oov_dropout > 0 and self.id_mapping != "vocab":
            raise ConfigError(
                f"config key '{key}.oov_dropout' = {self.oov_dropout} needs id_mapping = \"vocab\" "
                "(OOV rows to drop to)"
            )
        if self.l2 >= 0:
            check_range(self.l2, f"{key}.l2", min=0.0)
        check_one_of(self.id_mapping, ID_MAPPINGS, f"{key}.id_mapping")
        check_one_of(self.dtype, ID_DTYPES, f"{key}.dtype")
        if self.pooling:
            check_one_of(self.pooling, POOLINGS, f"{key}.pooling")
        if self.pooling == "target_attention":
            if self.max_len <= 1:
                raise ConfigError(
                    f"config key '{key}.max_len' = {self.max_len}: pooling = 'target_attention' needs a list "
                    "(max_len > 1)"
                )
            if not self.target:
                raise ConfigError(
                    f"config key '{key}.target' is empty: pooling = 'target_attention' needs the candidate "
                    "feature's name"
                )
            if self.target == self.name:
                raise ConfigError(f"config key '{key}.target' = {self.target!r}: a feature cannot attend to itself")
        elif self.target:
            raise ConfigError(
                f"config key '{key}.target' = {self.target!r} is set but {key}.pooling is {self.pooling_mode!r}; "
                'target is only for pooling = "target_attention"'
            )


@dataclass
class FeaturesConfig:
    """What each column means."""

    labels: list[str] = field(default_factory=lambda: ["click", "finish"])
    """Label columns, one per task, values in {0, 1}."""
    user_id: str = "user_id"
    """Column with the user id (int64), used for UAUC; empty disables UAUC."""
    dense: list[str] = field(default_factory=list)
    """Dense numeric columns (float or int). Null / NaN / inf values are missing: counted, and filled by
    the model's dense input (the training mean; see dense_missing_flags). 'len(c)' is derived: the number
    of elements of list column c in the row (`pipeline.derived`)."""
    dense_transform: str = "auto"
    """Transform of every dense feature unless dense_transforms names it: 'auto' (heavy-tailed non-negative
    features -> 'log1p', else 'standardize'; the choice is printed and written to the run directory),
    'standardize' ((x - mean) / std), 'log1p' (sign(x) log1p(|x|), then standardized), 'clip' (clipped at
    the dense_clip_quantile and 1 - dense_clip_quantile quantiles, then standardized), 'bucketize'
    (dense_buckets equal-frequency buckets, fed as an embedding), 'none' (raw values, missing -> 0).
    Statistics come from one pass over the training rows."""
    dense_transforms: dict[str, str] = field(default_factory=dict)
    """Per-feature transform, e.g. {capital_gain = "bucketize"}."""
    dense_buckets: int = 128
    """Equal-frequency buckets of a 'bucketize' feature (one more embedding row holds missing values)."""
    dense_bucket_dim: int = 8
    """Embedding width of a bucketized feature."""
    dense_clip_quantile: float = 0.001
    """'clip' bounds: this quantile and 1 minus it."""
    dense_missing_flags: bool = False
    """Add a 0/1 'was missing' input per dense feature."""
    groups: list[str] = field(default_factory=lambda: ["user", "item", "context", "sequence"])
    """Semantic group order used by tokenization."""
    sparse: list[SparseFeature] = field(default_factory=list)
    """Categorical and sequence features, as [[features.sparse]] tables."""
    vocab_exact_ids: int = 1 << 22
    """Distinct ids per vocabulary table counted exactly (16 bytes each); beyond that a count-min sketch
    plus this many heavy hitters (`pipeline.vocab`)."""
    vocab_sketch_width: int = 1 << 20
    """Counters per row of the count-min sketch (4 rows of int64) used beyond vocab_exact_ids."""
    item_id: str = ""
    """Column with the candidate item id (int64 or string), used for the item-popularity baseline of every
    evaluation report (`metrics.baselines`) and as the key of the item catalogue that sparse features
    named `a[s]` look up (`pipeline.catalog`); empty: no item baseline."""

    def dense_transform_of(self, name: str) -> str:
        """The configured (unresolved: 'auto' stays 'auto') transform of dense feature `name`."""
        return self.dense_transforms.get(name, self.dense_transform)

    def validate(self) -> None:
        """Labels and features present, names unique, shared tables consistent, dense transforms known."""
        check_one_of(self.dense_transform, DENSE_TRANSFORMS, "features.dense_transform")
        for name, kind in self.dense_transforms.items():
            if name not in self.dense:
                raise ConfigError(
                    f"features.dense_transforms names {name!r}, which is not in features.dense {self.dense}"
                )
            check_one_of(kind, DENSE_TRANSFORMS, f"features.dense_transforms.{name}")
        check_range(self.dense_buckets, "features.dense_buckets", min=2)
        check_range(self.vocab_exact_ids, "features.vocab_exact_ids", min=1)
        check_range(self.vocab_sketch_width, "features.vocab_sketch_width", min=16)
        check_range(self.dense_bucket_dim, "features.dense_bucket_dim", min=1)
        check_range(
            self.dense_clip_quantile, "features.dense_clip_quantile", min=0.0, max=0.5, min_open=True, max_open=True
        )
        if not self.labels:
            raise ConfigError("config key 'features.labels' must name at least one label column (one per task)")
        if not self.sparse and not self.dense:
            raise ConfigError("config section 'features': no sparse or dense features configured")
        seen: set[str] = set()
        tables: dict[str, SparseFeature] = {}
        for i, sf in enumerate(self.sparse):
            key = f"features.sparse[{i}]"
            sf.validate(key, self.groups)
            if sf.name in seen:
                raise ConfigError(f"config key '{key}.name' = {sf.name!r} appears twice")
            seen.add(sf.name)
            other = tables.setdefault(sf.table_name, sf)
            if (other.vocab_size, other.dim) != (sf.vocab_size, sf.dim):
                raise ConfigError(
                    f"config key '{key}': table {sf.table_name!r} is shared with feature {other.name!r} but has a "
                    f"different vocab_size/dim ({sf.vocab_size}/{sf.dim} vs {other.vocab_size}/{other.dim})"
                )
            mine = (sf.id_mapping == "vocab", sf.min_count, sf.oov_buckets)
            theirs = (other.id_mapping == "vocab", other.min_count, other.oov_buckets)
            if mine != theirs and (sf.id_mapping == "vocab" or other.id_mapping == "vocab"):
                raise ConfigError(
                    f"config key '{key}': table {sf.table_name!r} is shared with feature {other.name!r}, so both need "
                    f"id_mapping = 'vocab' with the same min_count and oov_buckets (one vocabulary per table)"
                )

        by_name = {sf.name: sf for sf in self.sparse}
        for i, name in enumerate(self.dense):
            src = length_source(name)
            if src is not None and lookup_source(src) is not None:
                raise ConfigError(
                    f"config key 'features.dense[{i}]' = {name!r}: len() counts a list column of the files; "
                    f"{src!r} is derived (count its sequence instead: 'len({lookup_source(src)[1]})')"  # type: ignore[index]
                )
            if src is not None and src in by_name and by_name[src].max_len == 1:
                raise ConfigError(
                    f"config key 'features.dense[{i}]' = {name!r}: {src!r} is a scalar sparse feature (max_len 1); "
                    f"len() counts the elements of a list column"
                )
        for i, sf in enumerate(self.sparse):
            if lookup_source(sf.name) is not None:
                self._check_lookup(i, sf, by_name)
            if sf.pooling == "target_attention":
                q = by_name.get(sf.target)
                if q is None or q.max_len != 1 or q.dim != sf.dim:
                    what = "is not a feature" if q is None else f"has max_len {q.max_len}, dim {q.dim}"
                    raise ConfigError(
                        f"config key 'features.sparse[{i}].target' = {sf.target!r} {what}; expected a scalar feature "
                        f"(max_len 1) of dim {sf.dim} in features.sparse"
                    )

    def _check_lookup(self, i: int, sf: SparseFeature, by_name: dict[str, SparseFeature]) -> None:
        """A sparse feature `a[s]` (the attribute a of every item of sequence s, `pipeline.catalog`): s a list
        feature of the candidate item's table, a a feature of the sparse list whose table (and mapping) it
        shares, features.item_id a sparse feature."""
        key = f"features.sparse[{i}].name"
        attr, seq = lookup_source(sf.name)  # type: ignore[misc]
        item = by_name.get(self.item_id)
        a, s = by_name.get(attr), by_name.get(seq)
        if item is None or item.max_len != 1:
            raise ConfigError(
                f"config key '{key}' = {sf.name!r} looks {attr!r} up by item, so 'features.item_id' must name a "
                f"scalar sparse feature (the candidate item), got {self.item_id!r}"
            )
        if s is None or s.max_len == 1 or lookup_source(seq) is not None:
            raise ConfigError(
                f"config key '{key}' = {sf.name!r}: {seq!r} must be a list feature (max_len > 1) in features.sparse"
            )
        if s.table_name != item.table_name or s.dtype != item.dtype:
            raise ConfigError(
                f"config key '{key}' = {sf.name!r}: the ids of {seq!r} must be items like {self.item_id!r} "
                f"(the same table and dtype; got tables {s.table_name!r} / {item.table_name!r})"
            )
        if a is None or lookup_source(attr) is not None or attr == self.item_id:
            raise ConfigError(
                f"config key '{key}' = {sf.name!r}: {attr!r} must be an attribute feature of the candidate item in "
                "features.sparse (not the item id itself)"
            )
        if sf.id_mapping != "vocab":
            raise ConfigError(
                f"config key 'features.sparse[{i}].id_mapping' = {sf.id_mapping!r}: {sf.name!r} needs \"vocab\" "
                "(the item catalogue is built and saved with the vocabularies)"
            )
        if (sf.table_name, sf.id_mapping, sf.dtype) != (a.table_name, a.id_mapping, a.dtype):
            raise ConfigError(
                f"config key 'features.sparse[{i}]' ({sf.name!r}) must share {attr!r}'s table, id_mapping and dtype "
                f"(set table = {a.table_name!r}, id_mapping = {a.id_mapping!r}, dtype = {a.dtype!r})"
            )
        if sf.oov_dropout > 0:  # (a differing min_count is refused above: one vocabulary per table)
            raise ConfigError(
                f"config key 'features.sparse[{i}]' ({sf.name!r}): its ids are {attr!r}'s, counted there; set no "
                "oov_dropout on it"
            )

    def table_names(self) -> list[str]:
        """Embedding table names in first-appearance order."""
        return list(dict.fromkeys(sf.table_name for sf in self.sparse))


@dataclass
class DataConfig:
    """Where the data lives and how it is read."""

    train: str = "data/default/train"
    """Training data: a directory, glob, file, or URI (file://, s3://, gs://, hdfs://)."""
    eval: str = "data/default/eval"
    """Held-out test data (same forms as `train`), evaluated at the end (with the best weights when there
    is validation data); empty disables it. Without validation data it is also what eval_every scores."""
    valid: str = ""
    """Validation data (same forms as `train`): scored every training.eval_every steps and at every epoch
    end, for early stopping and the best checkpoint. Empty: see valid_fraction."""
    valid_fraction: float = 0.0
    """Carve validation rows out of `train` instead: the last fraction of its rows in file / row-group
    order (deterministic; those rows are never trained on). 0 = no carve."""
    batch_size: int = 256
    """Rows per batch on each rank (the global batch is batch_size x world size). Derived from
    `global_batch_size` when that is set."""
    global_batch_size: int = 0
    """Rows per optimizer step over all ranks; > 0 sets batch_size = global_batch_size / world size (the
    world size must divide it), so a recipe trains with the same batch on 1 process or 8. Giving
    --data.batch_size on the command line as well is an error. 0: batch_size is per rank."""
    eval_batch_size: int = 1024
    """Rows per eval batch on each rank."""
    num_workers: int = 0
    """Reader processes per rank (0 reads in the training process: on a machine without spare cores
    the cheapest, see bench.pipeline; >= 1 takes decoding off the training process)."""
    shuffle: bool = True
    """Shuffle work units per (seed, epoch) and rows within a bounded window."""
    shuffle_window: int = 16384
    """Rows held in the in-window shuffle buffer of each reader (rounded down to whole batches). The
    per-window work is amortised over more rows as it grows (bench.pipeline: 16384 reads ~3% cheaper
    than 8192 per row; 32768 no better), and it bounds memory: one window plus
    `prefetch_row_groups` decoded row groups per reader."""
    drop_last: bool = True
    """Balance ranks by dropping the uneven tail of an epoch (True) or padding it with zero-weight rows
    (False: empty bags, zero dense and labels, row id -1); either way every rank runs the same number
    of steps, and every batch has exactly batch_size rows."""
    on_bad_file: str = "error"
    """'error': a corrupt file or a schema problem stops the job before training with a one-line
    error naming file and column. 'skip': such files are skipped and counted."""
    plan_threads: int = 0
    """Threads reading Parquet footers while planning; 0 = the CPU count on a local filesystem (the work
    is CPU-bound there) and 32 on a remote one (each footer is a round trip: latency, not bytes, is the
    cost). bench.plan measures it."""
    row_id_column: str = "row_id"
    """Column of unique int64 row ids used for the exactly-once audit; empty disables the audit."""
    prefetch_row_groups: int = 2
    """Decoded row groups each reader may hold at once (bounds memory)."""
    verify_checksums: bool = True
    """Verify Parquet page checksums (CRC-32) where the writer stored them (`pipeline.tools.synth` and
    `criteo` do; pyarrow's `write_page_checksum=True`): a flipped bit stops the run with the file, column
    and row group instead of training on changed values. Pages without checksums read as before."""

    def validate(self) -> None:
        """Paths present, sizes and counts in range, names known."""
        if not self.train:
            raise ConfigError("config key 'data.train' is empty; expected a directory, glob, file or URI")
        check_range(self.valid_fraction, "data.valid_fraction", min=0.0, max=1.0, max_open=True)
        if self.valid and self.valid_fraction > 0:
            raise ConfigError("data.valid and data.valid_fraction are both set; pick one source of validation rows")
        check_range(self.plan_threads, "data.plan_threads", min=0)
        check_range(self.global_batch_size, "data.global_batch_size", min=0)
        for name in ("batch_size", "eval_batch_size", "shuffle_window", "prefetch_row_groups"):
            check_range(getattr(self, name), f"data.{name}", min=1)
        check_range(self.num_workers, "data.num_workers", min=0)
        check_one_of(self.on_bad_file, BAD_FILE_POLICIES, "data.on_bad_file")
