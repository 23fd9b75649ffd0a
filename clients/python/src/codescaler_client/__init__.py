"""codescaler-client: the trainer-side client of CodeScaler Serve, with httpx and tenacity only.

``CodeScalerClient`` (blocking) and ``AsyncCodeScalerClient`` (asyncio) score and rank
over HTTP with retries; ``codescaler_client.integrations`` holds the OpenRLHF, veRL and
TRL adapters. Nothing here imports the server, torch or transformers.
"""

from codescaler_client.client import AsyncCodeScalerClient, CodeScalerClient
from codescaler_client.results import CodeScalerError, ItemLike, RankResult, RewardResult, ScoreItem, ScoreResult
from codescaler_client.retry import RetryPolicy, retry_after_seconds

__all__ = ["AsyncCodeScalerClient", "CodeScalerClient", "CodeScalerError", "ItemLike", "RankResult", "RetryPolicy",
           "RewardResult", "ScoreItem", "ScoreResult", "retry_after_seconds"]
