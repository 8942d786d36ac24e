"""A deterministic prompt writer: a structured video prompt from a topic.

Same inputs, same text: timing markers, shots, camera, lighting and mood,
shaped by the technique, the duration and the locale.
"""

from __future__ import annotations

import hashlib
import random

from nanophoto.contract import Locale, Technique

# Section labels per locale: Shot, Camera, Lighting, Atmosphere and mood, Technique.
_LABELS: dict[Locale, tuple[str, str, str, str, str]] = {
    Locale.EN: ("Shot", "Camera", "Lighting", "Atmosphere and mood", "Technique"),
    Locale.ZH: ("镜头", "机位", "灯光", "氛围与情绪", "手法"),
    Locale.ZH_TW: ("鏡頭", "機位", "燈光", "氛圍與情緒", "手法"),
    Locale.JA: ("ショット", "カメラ", "照明", "雰囲気とムード", "技法"),
    Locale.KO: ("샷", "카메라", "조명", "분위기와 무드", "기법"),
    Locale.ES: ("Plano", "Cámara", "Iluminación", "Atmósfera y tono", "Técnica"),
    Locale.FR: ("Plan", "Caméra", "Éclairage", "Atmosphère et ambiance", "Technique"),
    Locale.DE: ("Einstellung", "Kamera", "Licht", "Atmosphäre und Stimmung", "Technik"),
    Locale.PT: ("Plano", "Câmera", "Iluminação", "Atmosfera e clima", "Técnica"),
    Locale.RU: ("Кадр", "Камера", "Свет", "Атмосфера и настроение", "Приём"),
    Locale.AR: ("لقطة", "الكاميرا", "الإضاءة", "الأجواء والمزاج", "الأسلوب"),
}

_CAMERA: dict[Technique, tuple[str, ...]] = {
    Technique.MONTAGE: ("quick cut on the beat", "static close-up", "whip pan"),
    Technique.LONG_TAKE: ("unbroken steadicam glide", "slow push-in", "orbit"),
    Technique.TIME_LAPSE: ("locked-off tripod", "motion-control slide", "slow tilt"),
    Technique.SLOW_MOTION: ("high-speed 120 fps", "macro follow", "gentle crane"),
    Technique.TRACKING_SHOT: ("dolly alongside", "lead the subject", "low tracking"),
    Technique.AERIAL_VIEW: ("drone top-down", "sweeping flyover", "rising reveal"),
    Technique.POV: ("first-person handheld", "eye-level glance", "head turn"),
    Technique.SPLIT_SCREEN: ("mirrored halves", "left/right contrast", "grid of four"),
    Technique.MATCH_CUT: ("shape match on cut", "motion-matched cut", "graphic match"),
    Technique.FADE_TRANSITION: ("fade from black", "cross-dissolve", "fade to white"),
}
_LIGHTING = (
    "golden-hour backlight with soft rim",
    "cool blue dawn, low contrast",
    "hard noon sun, crisp shadows",
    "neon practicals against deep shadow",
    "overcast diffuse light, muted palette",
)
_MOOD = ("hopeful and warm", "quiet and contemplative", "energetic, rising", "mysterious")
_ACTIONS = (
    "establishes the setting",
    "reveals the subject in detail",
    "follows the key movement",
    "lingers on a telling detail",
    "widens for the finale",
    "closes on a resonant image",
)


def write_prompt(topic: str, technique: Technique, duration: int, locale: Locale) -> str:
    """The structured prompt for these inputs; identical inputs, identical text."""
    seed = hashlib.sha256(f"{topic}|{technique}|{duration}|{locale}".encode()).digest()
    rng = random.Random(seed)
    shot, camera, lighting, mood, technique_label = _LABELS[locale]
    shots = 4 if duration <= 10 else 5
    marks = [round(duration * i / shots, 1) for i in range(shots + 1)]
    lines = [
        f"{topic}",
        f"{technique_label}: {technique.value} · {duration}s · {locale.value}",
        "",
    ]
    for index in range(shots):
        start, end = marks[index], marks[index + 1]
        lines.append(
            f"[{start:04.1f}s–{end:04.1f}s] {shot} {index + 1}: {_ACTIONS[index]}. "
            f"{camera}: {rng.choice(_CAMERA[technique])}."
        )
    lines += [
        "",
        f"{lighting}: {rng.choice(_LIGHTING)}.",
        f"{mood}: {rng.choice(_MOOD)}.",
    ]
    return "\n".join(lines) + "\n"
