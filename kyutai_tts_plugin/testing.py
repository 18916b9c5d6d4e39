"""A tiny random-weight checkpoint in the exact file layout of `kyutai/tts-1.6b-en_fr`.

It produces noise, but it exercises every code path (config parsing, Hugging Face style file names,
tokenizer, voices, LM, Mimi) in seconds on a CPU: for tests, examples and offline pipeline checks.
"""

from __future__ import annotations

import copy
import io
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import EngineStep, SessionStep, TTSEngine

TEST_VOCAB_SIZE = 512  # vocabulary of the test tokenizer (= TINY_LM_CONFIG["text_card"])
TEST_VOICES = (
    "expresso/ex03-ex01_happy_001_channel1_334s.wav",
    "unmute-prod-website/default_voice.wav",
    "vctk/p225_023.wav",
)

# English and French sentences (digits, punctuation, accents) for the test tokenizer. Whatever is not
# here (emoji, arrows, CJK, ...) is unknown to it, which is what the unknown-character tests need.
_CORPUS_EN = """\
Hello, world! This is a test of the streaming text to speech engine.
The quick brown fox jumps over the lazy dog.
How are you doing today? I'm fine, thanks for asking.
It's 7:30 in the morning and the coffee is ready.
Please call me back at 555-0199 before 6 p.m.
We sold 1,250 tickets in 3 days, that's about 417 per day.
The meeting is on Monday, March 14th, at 10 o'clock.
She said: "Don't worry, everything will be okay."
Wait... are you sure about that?
The temperature dropped to -5 degrees last night.
Our flight leaves from gate 23B at 4:45 PM.
He paid $19.99 for the book and 2 euros for the coffee.
Can you hear me now? Yes, loud and clear.
The results were impressive: 98% accuracy on the test set.
Turn left, then right, and then go straight for 200 meters.
I'd like a table for two, please.
What time does the museum open on Sundays?
My phone number is 0123 456 789; write it down.
The train was delayed by 15 minutes because of the snow.
Let's meet at the station around noon.
Thank you very much for your help yesterday.
Could you repeat that, please? I didn't catch the last part.
The recipe needs 3 eggs, 200 grams of flour and a pinch of salt.
In 1969, humans walked on the Moon for the first time.
A voice agent answers questions in real time.
The model reads text one word at a time and speaks it aloud.
Streaming means the audio starts before the text is finished.
Latency matters: every hundred milliseconds counts.
Please hold while I transfer your call.
Your order number is 48213 and it will ship tomorrow.
The weather today is sunny with a high of 24 degrees.
Don't forget to bring your umbrella, it might rain later.
I can't believe it's already Friday!
We're open from 9 to 5, Monday through Saturday.
The children played in the garden until sunset.
He whispered something, but nobody heard it.
Is this seat taken? No, go ahead.
The library closes early on holidays.
She has lived in London for 12 years.
My favorite colors are blue, green and orange.
Excuse me, where is the nearest pharmacy?
The concert was amazing; the band played for three hours.
Two plus two equals four, and ten minus three equals seven.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9 must be spoken clearly.
The price went up by 12.5 percent in a single year.
Send the report to the team by the end of the week.
I think we should try again tomorrow morning.
They arrived late, tired but happy.
Breakfast is served between 7 and 10.
This sentence has a comma, a semicolon; and a period.
Really? Wow! That's incredible.
The password must contain at least 8 characters.
Call 911 in case of emergency.
It was the best of times, it was the worst of times.
To be or not to be, that is the question.
All that glitters is not gold.
A journey of a thousand miles begins with a single step.
The early bird catches the worm.
Knowledge is power, and time is money.
Actions speak louder than words.
Where there's a will, there's a way.
Every cloud has a silver lining.
Practice makes perfect.
Better late than never.
The pen is mightier than the sword.
Honesty is the best policy.
I would like to book a room for three nights, from the 2nd to the 5th of June.
Your appointment is confirmed for Tuesday at 2:15.
The battery is at 42 percent; please plug in the charger.
We have 3 new messages and 1 missed call.
The package weighs 2.4 kilograms.
Mount Everest is 8,849 meters high.
The speed of light is about 300,000 kilometers per second.
He scored 3 goals in the last 10 minutes of the match.
Open the window, it's too hot in here.
Could you please turn down the music?
The cat is sleeping on the sofa again.
I've been waiting for you since 8 o'clock.
Let me think about it and get back to you.
Good morning, everyone, and welcome to the show.
Good evening, ladies and gentlemen.
Goodbye, and see you next time!
The answer is forty-two.
We need milk, bread, cheese, apples and tomatoes.
The bus stops here every 20 minutes.
Please speak slowly and clearly.
Artificial intelligence is changing the way we work.
The conference will take place in Paris next spring.
He reads the news every morning over breakfast.
Water boils at 100 degrees Celsius.
There are 365 days in a year, and 366 in a leap year.
Her birthday is on the 31st of December.
The store is on the corner of 5th Avenue and 42nd Street.
I'm sorry, I don't understand the question.
Could you spell your last name, please?
Press 1 for English, press 2 for French.
The total comes to 87 dollars and 50 cents.
Version 2.0 was released on 2024-05-17.
The ratio is 3 to 1, or 75% versus 25%.
Hmm, let me check that for you.
Oh no! I left my keys at home.
Well, that's a good question.
Honestly, I'm not sure, but I'll find out.
"""

_CORPUS_FR = """\
Bonjour, comment allez-vous aujourd'hui ?
Je vais très bien, merci beaucoup.
Il est 8 h 30 et le café est prêt.
Nous avons vendu 1 250 billets en 3 jours.
La réunion aura lieu lundi 14 mars à 10 heures.
Elle a dit : « Ne t'inquiète pas, tout ira bien. »
Attendez... vous êtes sûr ?
La température est descendue à -5 degrés cette nuit.
Notre vol part de la porte 23B à 16 h 45.
Il a payé 19,99 € pour le livre et 2 euros pour le café.
Vous m'entendez ? Oui, très bien.
Les résultats sont impressionnants : 98 % de précision.
Tournez à gauche, puis à droite, puis tout droit sur 200 mètres.
Je voudrais une table pour deux, s'il vous plaît.
À quelle heure ouvre le musée le dimanche ?
Mon numéro de téléphone est le 01 23 45 67 89.
Le train a eu 15 minutes de retard à cause de la neige.
Retrouvons-nous à la gare vers midi.
Merci beaucoup pour votre aide d'hier.
Pouvez-vous répéter, s'il vous plaît ?
La recette demande 3 œufs, 200 grammes de farine et une pincée de sel.
En 1969, l'homme a marché sur la Lune pour la première fois.
Un agent vocal répond aux questions en temps réel.
Le modèle lit le texte mot à mot et le prononce à voix haute.
La latence compte : chaque centaine de millisecondes est importante.
Veuillez patienter, je transfère votre appel.
Votre commande numéro 48213 sera expédiée demain.
Aujourd'hui, il fait beau avec un maximum de 24 degrés.
N'oubliez pas votre parapluie, il pourrait pleuvoir.
Je n'arrive pas à croire que c'est déjà vendredi !
Nous sommes ouverts de 9 h à 17 h, du lundi au samedi.
Les enfants ont joué dans le jardin jusqu'au coucher du soleil.
Il a murmuré quelque chose, mais personne ne l'a entendu.
Cette place est-elle libre ? Oui, allez-y.
La bibliothèque ferme tôt les jours fériés.
Elle habite à Londres depuis 12 ans.
Mes couleurs préférées sont le bleu, le vert et l'orange.
Excusez-moi, où se trouve la pharmacie la plus proche ?
Le concert était génial ; le groupe a joué pendant trois heures.
Deux plus deux font quatre, et dix moins trois font sept.
Le prix a augmenté de 12,5 % en un an.
Envoyez le rapport à l'équipe avant la fin de la semaine.
Je pense qu'on devrait réessayer demain matin.
Ils sont arrivés en retard, fatigués mais heureux.
Le petit-déjeuner est servi entre 7 h et 10 h.
Vraiment ? Waouh ! C'est incroyable.
Le mot de passe doit contenir au moins 8 caractères.
Appelez le 112 en cas d'urgence.
Être ou ne pas être, telle est la question.
Tout ce qui brille n'est pas or.
Petit à petit, l'oiseau fait son nid.
Il ne faut pas vendre la peau de l'ours avant de l'avoir tué.
Qui vivra verra.
Mieux vaut tard que jamais.
L'habit ne fait pas le moine.
Je voudrais réserver une chambre pour trois nuits, du 2 au 5 juin.
Votre rendez-vous est confirmé pour mardi à 14 h 15.
La batterie est à 42 % ; branchez le chargeur.
Vous avez 3 nouveaux messages et 1 appel manqué.
Le colis pèse 2,4 kilogrammes.
Le mont Blanc culmine à 4 805 mètres.
Il a marqué 3 buts dans les 10 dernières minutes du match.
Ouvrez la fenêtre, il fait trop chaud ici.
Pourriez-vous baisser la musique, s'il vous plaît ?
Le chat dort encore sur le canapé.
Je vous attends depuis 8 heures.
Laissez-moi y réfléchir et je vous rappelle.
Bonjour à tous, et bienvenue dans l'émission.
Bonsoir, mesdames et messieurs.
Au revoir, et à la prochaine !
La réponse est quarante-deux.
Il nous faut du lait, du pain, du fromage, des pommes et des tomates.
Le bus passe ici toutes les 20 minutes.
Parlez lentement et clairement, s'il vous plaît.
L'intelligence artificielle change notre façon de travailler.
La conférence aura lieu à Paris au printemps prochain.
Il lit les nouvelles chaque matin au petit-déjeuner.
L'eau bout à 100 degrés Celsius.
Il y a 365 jours dans une année, et 366 dans une année bissextile.
Son anniversaire est le 31 décembre.
Je suis désolé, je ne comprends pas la question.
Pourriez-vous épeler votre nom de famille ?
Tapez 1 pour l'anglais, tapez 2 pour le français.
Le total s'élève à 87 euros et 50 centimes.
La version 2.0 est sortie le 17/05/2024.
Euh, laissez-moi vérifier cela pour vous.
Oh non ! J'ai oublié mes clés à la maison.
Eh bien, c'est une bonne question.
Honnêtement, je ne suis pas sûr, mais je vais me renseigner.
Où est la gare ? Là-bas, après le pont.
Ça va ? Ça va très bien, merci.
L'été dernier, nous sommes allés à la mer en août.
Noël tombe un mercredi cette année.
Le garçon a mangé une crème brûlée et un gâteau.
Ce n'est qu'un au revoir, mes frères.
Où êtes-vous né ? À Lyon, en 1987.
Voilà, c'est terminé : merci de votre écoute !
"""


def corpus_sentences() -> list[str]:
    """The built-in bilingual corpus, plus generated number and time sentences."""
    lines = [s for s in (_CORPUS_EN + _CORPUS_FR).splitlines() if s.strip()]
    for i in range(0, 100, 7):
        lines.append(
            f"Item {i} costs {i * 3}.{i % 10}5 dollars, {i + 1}% off until {i % 12 + 1}:{i % 60:02d}."
        )
        lines.append(f"L'article {i} coûte {i * 3},{i % 10}5 euros, soit {i + 1} % de remise.")
    return lines


def train_test_tokenizer(path: str | os.PathLike[str], vocab_size: int = TEST_VOCAB_SIZE) -> Path:
    """Train a small English+French SentencePiece model at `path` (deterministic, about a second).

    Ids 0..3 are unk/bos/eos/pad as in the real tokenizer, where they double as the DSM control
    tokens (WORD, MAIN, OTHER, PAD).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_sentences()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


_CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]

# Same keys and nesting as the real config.json (engine.md §1), tiny sizes.
TINY_LM_CONFIG: dict[str, Any] = {
    "card": 2048,
    "n_q": 32,
    "dep_q": 32,
    "delays": [0, 0] + [2] * 31,
    "dim": 64,
    "text_card": TEST_VOCAB_SIZE,
    "text_card_out": None,
    "existing_text_padding_id": 3,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 500,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_num_heads": 4,
    "depformer_num_layers": 2,
    "depformer_dim_feedforward": 96,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "depformer_low_rank_embeddings": 16,
    "depformer_weights_per_step_schedule": list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
    "cross_attention": True,
    "demux_second_stream": True,
    "conditioners": {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 32}},
        "cfg": {
            "type": "lut",
            "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop", "possible_values": _CFG_VALUES},
        },
        "control": {
            "type": "lut",
            "lut": {"n_bins": 1, "dim": 64, "tokenizer": "noop", "possible_values": ["ok"]},
        },
    },
    "fuser": {
        "cross_attention_pos_emb": True,
        "cross_attention_pos_emb_scale": 1,
        "sum": ["control", "cfg"],
        "prepend": [],
        "cross": ["speaker_wavs"],
    },
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    "model_id": {"sig": "0123abcd", "epoch": 7},
    "model_type": "tts",
    "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
    "moshi_name": "dsm_tts_0123abcd@7.safetensors",
    "mimi_name": "tokenizer-test-mimi.safetensors",
    "tokenizer_name": "tokenizer_spm_test.model",
    "mimi_config_name": "mimi_config.json",
}

VOICE_FRAMES = 125  # 10 s of speaker embedding at 12.5 Hz, as in kyutai/tts-voices


def write_test_voices(
    directory: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    voices: Sequence[str] = TEST_VOICES,
    seed: int = 0,
) -> Path:
    """Write `<name>.<sig>@<epoch>.safetensors` voice files (random `speaker_wavs`) under `directory`."""
    import torch
    from safetensors.torch import save_file

    cfg = config or TINY_LM_CONFIG
    dim = int(cfg["conditioners"]["speaker_wavs"]["tensor"]["dim"])
    sig, epoch = str(cfg["model_id"]["sig"]), str(cfg["model_id"]["epoch"])
    root = Path(directory)
    for i, name in enumerate(voices):
        path = root / f"{name}.{sig}@{epoch}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed * 1000 + 100 + i)
        emb = torch.randn(1, dim, VOICE_FRAMES, generator=gen)
        save_file({"speaker_wavs": emb}, str(path), metadata={"sig": sig, "epoch": epoch})
    return root


def make_test_checkpoint(
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    voices: Sequence[str] = TEST_VOICES,
) -> Path:
    """Write a tiny random checkpoint (config.json, LM, Mimi, tokenizer, voices/) into `directory`.

    Random weights: it produces noise. Load it with
    ``TTSEngine.from_pretrained(directory, voice_repo=directory / "voices")``.
    """
    # Imported here: these modules pull in torch and the network definitions.
    from safetensors.torch import save_file

    from .checkpoint import TTSConfig
    from .lm import random_lm_state_dict
    from .mimi import TINY_MIMI_CONFIG, random_mimi_state_dict

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    raw = copy.deepcopy(TINY_LM_CONFIG)
    config = TTSConfig.from_dict(raw, source="TINY_LM_CONFIG")
    (root / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (root / raw["mimi_config_name"]).write_text(json.dumps(TINY_MIMI_CONFIG.to_dict(), indent=2) + "\n")
    train_test_tokenizer(root / raw["tokenizer_name"])
    save_file(_contiguous(random_lm_state_dict(config, seed)), str(root / raw["moshi_name"]))
    save_file(_contiguous(random_mimi_state_dict(TINY_MIMI_CONFIG, seed)), str(root / raw["mimi_name"]))
    write_test_voices(root / "voices", raw, voices, seed)
    return root


def _contiguous(state: dict[str, Any]) -> dict[str, Any]:
    # safetensors refuses non-contiguous or shared-storage tensors.
    return {k: v.contiguous().clone() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# Driving the engine in steps, for tests: order in time is asserted in engine steps, never seconds.

HANG_GUARD_S = 120.0  # only ever reached when the thing waited for never happens (a failing test)


class StepRecorder:
    """Records every step of every session of an engine (a step observer).

    ``wait_for`` blocks until a condition over the recording holds, woken by each step: tests wait
    for the step that proves a thing instead of sleeping and looking.
    """

    def __init__(self, engine: TTSEngine) -> None:
        self._cv = threading.Condition()
        self._steps: dict[str, list[SessionStep]] = defaultdict(list)
        self._engine_index: dict[str, list[int]] = defaultdict(list)
        self.engine_steps = 0
        self.close = engine.add_step_observer(self)

    def __call__(self, step: EngineStep) -> None:
        with self._cv:
            for s in step.sessions:
                self._steps[s.session_id].append(s)
                self._engine_index[s.session_id].append(step.index)
            self.engine_steps += 1
            self._cv.notify_all()

    def __enter__(self) -> StepRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def of(self, session: Any) -> list[SessionStep]:
        """The steps of `session` (a session or its id), in order."""
        with self._cv:
            return list(self._steps[_session_id(session)])

    def count(self, session: Any) -> int:
        with self._cv:
            return len(self._steps[_session_id(session)])

    def engine_indices(self, session: Any) -> list[int]:
        """The engine step index of each step of `session`."""
        with self._cv:
            return list(self._engine_index[_session_id(session)])

    def tokens(self, session: Any) -> list[tuple[int, int, tuple[int, ...]]]:
        """(sampled text, fed text, audio tokens) at each step of `session`."""
        return [(s.sampled_text, s.fed_text, s.audio) for s in self.of(session)]

    def wait_for(self, condition: Callable[[], bool], what: str = "the condition") -> None:
        with self._cv:
            if not self._cv.wait_for(condition, timeout=HANG_GUARD_S):
                raise AssertionError(f"the engine never reached {what}")


class StepGate:
    """Holds the engine between two steps, so a test can act at an exact step (a step observer).

    While held, the worker parks after each step until `allow` grants more steps. `held_at` is the
    index of the engine step after which the worker is parked (None while it runs). Observers run in
    the order they were added: add a `StepRecorder` before the gate so it sees the parked step.
    """

    def __init__(self, engine: TTSEngine, *, held: bool = False) -> None:
        self._cv = threading.Condition()
        self._held = held
        self._credits = 0
        self.held_at: int | None = None
        self._remove = engine.add_step_observer(self)

    def __call__(self, step: EngineStep) -> None:
        with self._cv:
            if self._credits > 0:
                self._credits -= 1
                if self._credits > 0 or not self._held:
                    return
            if not self._held:
                return
            self.held_at = step.index
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._held or self._credits > 0)
            self.held_at = None

    def hold(self) -> None:
        """Park the worker after the step it is in (or the next one)."""
        with self._cv:
            self._held = True
            self._credits = 0

    def wait_held(self) -> int:
        """Wait until the worker is parked; returns the index of the step it is parked after."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.held_at is not None, timeout=HANG_GUARD_S):
                raise AssertionError("the engine never stepped while the gate was held")
            assert self.held_at is not None
            return self.held_at

    def allow(self, steps: int = 1) -> None:
        """Let the parked worker take `steps` more steps, then park again."""
        with self._cv:
            self._credits += steps
            self.held_at = None
            self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def close(self) -> None:
        self.release()
        self._remove()

    def __enter__(self) -> StepGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _session_id(session: Any) -> str:
    return session if isinstance(session, str) else str(session.id)
