"""Client of pagedllm's Triton `llm` model over gRPC or HTTP: generate from text, token ids or prompt
embeddings, whole or streamed, synchronously (`Client`) or with asyncio (`AsyncClient`).
The command line is `pagedllm-client` (cli.py)."""
from .aio import AsyncChunkStream, AsyncClient
from .client import ChunkStream, Client
from .options import GenerateOptions
from .types import Chunk, PagedLLMError, Result

__all__ = ["AsyncChunkStream", "AsyncClient", "Chunk", "ChunkStream", "Client", "GenerateOptions", "PagedLLMError",
           "Result"]
