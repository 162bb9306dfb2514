"""SpinBench: a procedural benchmark world for SpinML (a *user* of the system, not part of its core).

`spinbench.world` draws dogs in four poses (the states to classify) in rooms, deterministic by seed,
with exact masks: a public corpus for training a diffusion model, and users whose dog and room lie
outside the public range, written as ordinary request folders that `spinml run` accepts.
"""

from spinbench.world import (
    SIZE,
    STATE_PHRASES,
    STATES,
    Appearance,
    Furniture,
    Room,
    Sample,
    User,
    caption_for,
    contact_sheet,
    is_public_appearance,
    is_public_colour,
    make_user,
    prompt_for,
    public_appearance,
    public_corpus,
    public_room,
    render,
    render_room,
    user_samples,
    write_user_request,
)

__all__ = [
    "SIZE", "STATES", "STATE_PHRASES", "Appearance", "Furniture", "Room", "Sample", "User", "caption_for",
    "contact_sheet", "is_public_appearance", "is_public_colour", "make_user", "prompt_for", "public_appearance",
    "public_corpus", "public_room", "render", "render_room", "user_samples", "write_user_request",
]
