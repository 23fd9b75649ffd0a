"""The baseline: the reward server users write themselves (contender (a) of the benchmark).

The pattern of OpenRLHF's serve_rm and of most hand-written FastAPI reward servers:
an ``async`` route that, per request, extracts the code, applies the chat template,
tokenizes with padding and runs one forward of that request's items. No batching
across requests, no prefix reuse, the attention mask of ``tokenizer(padding=True)``.
It accepts the body of ``POST /v1/score`` so both servers get byte-identical requests.

Run: ``python -m loadtests.naive --model DIR --port PORT``.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForSequenceClassification, AutoTokenizer

FENCE = re.compile(r"```\w*\n(.*?)```", re.DOTALL)


def create_app(model_dir: str, device: str = "cpu", dtype: str = "float32") -> FastAPI:
    """A FastAPI app scoring each request in one forward of its own."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await request.json()
        texts = []
        for item in body["items"]:
            found = FENCE.findall(item["response"])
            code = found[0].strip() if len(found) == 1 else ""
            chat = [{"role": "user", "content": item["problem"]}, {"role": "assistant", "content": code}]
            texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, 0].float().tolist()
        return {"results": [{"index": i, "score": s} for i, s in enumerate(logits)]}

    return app


def main() -> None:
    """Serve the baseline on loopback."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    uvicorn.run(create_app(args.model, args.device, args.dtype), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
