"""Ray Data preprocessing: read, clean, deduplicate, split, tokenize, write Parquet.

Nothing here imports train, tune or serve: data flows one way.
"""
