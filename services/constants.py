"""Constants every tier shares, each defined once with its unit (``tests/test_single_source.py``
fails when one of them is written out anywhere else).

Audio geometry follows the published MiDashengLM checkpoint: 16 kHz input, 10 ms mel frames,
40 ms encoder patches, 10.08 s encoder windows and one 5 Hz audio token per five patches.
"""

from __future__ import annotations


def exact_div(x: int, y: int) -> int:
    if x % y:
        raise ValueError(f"{x} is not a multiple of {y}")
    return x // y


SAMPLE_RATE = 16_000  # Hz: what the log-mel frontend and the encoder take
HOP_LENGTH = 160  # samples per mel frame (10 ms)
PATCH_FRAMES = 4  # mel frames per encoder patch (40 ms, 25 Hz)
SUBSAMPLE_FACTOR = 5  # encoder patches per audio token
ENCODER_WINDOW_FRAMES = 1008  # mel frames per encoder attention window
SAMPLES_PER_TOKEN = HOP_LENGTH * PATCH_FRAMES * SUBSAMPLE_FACTOR  # 3200 samples = 200 ms
TOKENS_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_TOKEN  # 5.0 audio tokens per second of audio
ENCODER_WINDOW_SECONDS = ENCODER_WINDOW_FRAMES * HOP_LENGTH / SAMPLE_RATE  # 10.08 s
ENCODER_WINDOW_PATCHES = exact_div(ENCODER_WINDOW_FRAMES, PATCH_FRAMES)  # 252

# Audio encodings a client may send (captions.proto AudioEncoding, the page's JSON, the config hash).
LINEAR16 = "LINEAR16"  # little-endian signed 16-bit PCM
FLOAT32 = "FLOAT32"  # little-endian IEEE float32 in [-1, 1]
ENCODINGS = (LINEAR16, FLOAT32)

# Caption defaults of a session (and of offline captioning, where they apply).
DEFAULT_PROMPT = "Caption the audio."
DEFAULT_WINDOW_SECONDS = 10.0  # s: the clip length the model was trained on
DEFAULT_HOP_SECONDS = 2.0  # s between interim captions
DEFAULT_MAX_NEW_TOKENS = 48  # tokens per live caption
SEGMENT = "segment"  # an interim describes its open segment so far (captions.proto InterimWindow)
SLIDING = "sliding"  # an interim describes the last window
INTERIM_WINDOWS = (SEGMENT, SLIDING)
DEFAULT_INTERIM_WINDOW = SEGMENT
DEFAULT_OFFLINE_MAX_NEW_TOKENS = 64  # tokens per offline caption

# Limits of what a client may ask for, enforced at the gateway and again behind it.
MAX_OFFLINE_PROMPT_CHARS = 1000  # characters in a Caption/BatchCaption prompt (captions.proto)
MAX_REQUEST_ID_CHARS = 128  # characters in CaptionRequest.request_id
MAX_OFFLINE_NEW_TOKENS = 256  # tokens per offline caption (GenerationOptions.max_new_tokens)
MAX_CLIP_SECONDS = 300.0  # s of audio one offline clip may decode to (longer: stream or segment it)
MAX_BATCH_ITEMS = 64  # clips per BatchCaption
MAX_LANGUAGE_CHARS = 35  # characters in a BCP-47 language hint
MAX_QUESTIONS = 8  # questions of one live session (captions.proto Question)
MAX_QUESTION_CHARS = 300  # characters of one question
MAX_ADAPTER_CHARS = 64  # characters in an adapter name
