"""The Delayed Streams Modeling text state machine.

The model predicts, on its text stream, only an *action*: WORD ("the next word starts now") or PAD.
This machine turns those actions into the text tokens actually fed back: it pops the next word,
feeds its tokens over the following steps, streams the tokens of the word two positions ahead on a
second (lookahead) stream, and enforces minimum / maximum padding between words.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

WORD = 0  # "a new word starts" action, and the muxed value of the second stream for it
MAIN_SPEAKER = 1
OTHER_SPEAKER = 2
PAD = 3


@dataclass(frozen=True)
class Entry:
    """One unit of the script: a word's tokens, or a pause (no tokens, `padding` steps)."""

    tokens: tuple[int, ...]
    text: str
    padding: int


@dataclass
class DSMState:
    entries: deque[Entry]
    remaining_padding: int
    forced_padding: int
    queued: deque[int] = field(default_factory=deque)
    lookahead_queued: deque[int] = field(default_factory=deque)
    end_step: int | None = None
    consumption_steps: list[int] = field(default_factory=list)
    transcript: list[tuple[str, int]] = field(default_factory=list)

    def tokens_ahead(self, ahead: int) -> tuple[int, ...]:
        """Tokens of the `ahead`-th upcoming entry that has tokens (pauses do not count)."""
        for entry in self.entries:
            if entry.tokens:
                ahead -= 1
                if ahead == 0:
                    return entry.tokens
        return ()


@dataclass(frozen=True)
class StateMachine:
    text_card: int  # cardinality of the text input, including the initial token (text_card + 1)
    second_stream_ahead: int = 2
    max_padding: int = 8
    initial_padding: int = 2

    def new_state(self) -> DSMState:
        return DSMState(deque(), self.initial_padding, self.initial_padding)

    def process(self, step: int, state: DSMState, sampled: int) -> int:
        """Consume the model's sampled text token at `step`; return the token to feed next."""
        action = sampled if sampled in (WORD, PAD) else PAD
        if state.queued or state.forced_padding > 0:
            action = PAD
        elif state.remaining_padding <= 0:
            action = WORD

        if action == WORD:
            if state.entries:
                entry = state.entries.popleft()
                state.consumption_steps.append(step)
                if entry.tokens:
                    state.transcript.append((entry.text, step))
                    state.queued.extend(entry.tokens)
                    if self.second_stream_ahead:
                        state.lookahead_queued.extend(state.tokens_ahead(self.second_stream_ahead))
                    state.remaining_padding = self.max_padding
                else:
                    action = PAD  # a pause entry: behave as if the model padded
                state.forced_padding = entry.padding
            else:
                # The model asks for a word after the last one: this is the end of speech. With a
                # lookahead stream the first such request is still fed as WORD.
                first_end = state.end_step is None
                action = WORD if (self.second_stream_ahead and first_end) else PAD
                if first_end:
                    state.end_step = step

        if action == PAD:
            if state.remaining_padding > 0:
                state.remaining_padding -= 1
            if state.forced_padding > 0:
                state.forced_padding -= 1
            main = state.queued.popleft() if state.queued else PAD
        else:
            main = WORD

        if not self.second_stream_ahead:
            return main
        second = -1
        if main == WORD:
            # The WORD action travels on the second stream; the main stream already carries the
            # word's first token.
            second = WORD
            main = state.queued.popleft() if state.queued else PAD
        elif state.lookahead_queued:
            second = state.lookahead_queued.popleft()
        return (second + 1) * self.text_card + main

    def next_start(self, step: int, state: DSMState, more_text: bool) -> int | None:
        """The step at which the next word starts (or speech ends) if nothing can move it any more.

        `step` is the next step to process. The model only chooses *when* to take the next entry
        while the padding rules leave it a choice; once they force the step (a long word's tokens
        outlast the maximum padding), it is known ahead. Found by running this machine on copies,
        once with the model always asking for a word and once never: the same step means certain.
        None while the model can still move it, or while it depends on entries not given yet
        (`more_text`: text may still be added after `state.entries`).
        """
        if state.end_step is not None:
            return state.end_step
        word = next((i for i, entry in enumerate(state.entries) if entry.tokens), None)
        if word is None and more_text:
            return None
        # Entries up to the next word are all the copies can consume before it starts.
        keep = word + 1 if word is not None else len(state.entries)
        found: set[int] = set()
        for choice in (WORD, PAD):
            copy = DSMState(
                deque(islice(state.entries, keep)),
                state.remaining_padding,
                state.forced_padding,
                deque(state.queued),
            )
            at = step
            while not copy.transcript and copy.end_step is None:
                self.process(at, copy, choice)
                at += 1
            found.add(copy.transcript[0][1] if copy.transcript else at - 1)  # at - 1: the end's step
        return found.pop() if len(found) == 1 else None
