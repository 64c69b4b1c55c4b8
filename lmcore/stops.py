"""Stop strings, as OpenAI and vLLM read them: shared by the engine (which ends generation at one) and the
chat route (which cuts a streamed answer before one). No torch: the Ingress replica imports it."""
from __future__ import annotations


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the stop string that is complete first, reading on (the earliest end; of two ending
    together the longer), as OpenAI and vLLM cut an answer: the stop string itself is not returned; and
    whether one was found. Reading a prefix finds the same one: a streamed answer is cut where it is whole."""
    found = [(i + len(x), i) for x in stops if (i := text.find(x)) >= 0]
    return (text[:min(found)[1]], True) if found else (text, False)
