"""Real-text verifiable domains for small chat models (sized for SmolLM2-135M-Instruct), with short answers.

    caps         Write the word 'potato' in capital letters.  -> POTATO                   (d1 3-6, d2 7-10 letters)
    word_math    Mia has 7 coins and gets 5 more. How many coins does Mia have now? Answer with a number.
                                                               -> 12                     (d1 add, d2 subtract)
    json_record  Write a JSON object with the keys "name" and "age" for Mia, who is 31 years old.
                                                               -> {"name": "Mia", "age": 31} (d1 2 keys, d2 3 keys)

Problems are generated in the package from fixed word, name and city lists (nothing is downloaded), in plain
English, so they use characters outside the character tokenizer's `ALPHABET`: each domain is registered with
`alphabet=string.printable` (a recipe that trains its own character model on them needs `tokenizer: {alphabet:
printable}`). Rewards (`mopd.verifiers.text`): `caps` 1 for the capitalised word alone, 0.5 when it appears inside
a longer reply, else partial character credit below 0.5 (a letter in the wrong case counts half); `word_math` 1 when
the reply's last number is the answer (``"9 + 8 = 17"``); `json_record` the share of fields right, halved unless the
whole reply parses as the object (a ```json fence or prose around it). Prompt spaces: `caps` 526 (so at most ~180
held out), `word_math` and `json_record` tens of thousands.

`PROMPTED` holds, per domain, a system prompt and few-shot examples (earlier chat turns) that make the model itself a
better teacher for that domain: a prompted teacher. Its examples use words, names and cities outside the generators'
lists, so no example is ever a held-out or a training prompt. Measured in `benchmarks/smol_headroom.py`.
"""

from __future__ import annotations

import json
import random
import string

from ..verifiers.text import exact_text_reward, json_fields_reward, last_number_reward
from .base import Problem, register_domain


def _listed(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# 526 common English words: `caps` draws its difficulty-1 words from the 281 of 3-6 letters, its difficulty-2
# words from the 245 of 7-10 letters.
WORDS: tuple[str, ...] = _listed("""
anchor animal answer apple autumn bakery banana basket beach berry bicycle blanket bottle branch bread bridge
bubble bucket butter button cabin cactus camera candle canyon carpet carrot castle cattle cereal chair cheese
cherry chicken circle cloud clover coffee collar comet copper corner cotton cousin cradle crayon cricket crystal
cupboard curtain cushion daisy dancer desert dinner doctor dolphin donkey dragon drawer dream driver eagle
engine envelope falcon farmer father feather fence field finger flame flower forest fountain fridge frozen
galaxy garlic giant ginger glass glove goose grape gravel guitar hammer harbor helmet hockey honey horse
hunter igloo island jacket jelly jewel jungle kettle kitchen kitten ladder lantern lemon letter lizard lobster
magnet mango marble market meadow melon mirror monkey morning mountain muffin museum napkin needle nest
noodle number ocean office olive onion orange orchard oyster paddle palace panda paper parrot peanut pebble
pencil pepper piano picnic pillow pirate planet pocket potato puppy puzzle rabbit radio rainbow record ribbon
river robot rocket saddle salmon sandal school scissors secret shadow shell shovel silver singer sister
snail soccer spider spoon spring squirrel stable star stone sugar summer sunset sweater table teacher thunder
ticket tiger toast tomato tower towel tractor travel tulip tunnel turtle umbrella valley velvet violin wagon
walnut wallet water whale window winter wizard yellow zebra acorn apron arrow badge bamboo barrel beetle
biscuit blossom bonnet bracelet breeze bronze buffalo cabbage canal canoe captain cedar chalk
chapel chimney cinnamon cobweb coconut compass cookie coral cupcake dagger denim diamond dinosaur
doorbell dragonfly drum duckling eclipse elbow emerald fabric ferry fiddle firefly flag flute fossil
freckle garage geyser glacier goblet granite hamster harvest hazel hedgehog hilltop iceberg ink jasmine
kayak kernel keyboard koala lagoon lamb laptop lava lemonade library lilac llama locket lollipop lunar maple
mascot meteor mitten moose mosaic nectar nugget oatmeal octopus orbit otter pancake parcel
peacock pearl penguin pickle pigeon pilot pine pizza plum pond poppy porch pretzel pumpkin quilt
raccoon radish raven reef rhino saffron sailor sapphire scarf seagull sesame sheep shrimp skate sled
slipper sparrow spinach sponge statue storm strawberry sunflower swan teapot temple thimble thistle toffee
torch tortoise trumpet tuba turnip unicorn vase village violet waffle walrus wheel whistle willow yogurt
airplane alligator backpack balcony bandage bathtub battery bedroom blueberry bookcase bowling broccoli brother
cabinet calendar cardigan carnival cartoon ceiling century chemist chestnut chocolate classroom climber coastline
cockpit college concert costume cottage courage crocodile cucumber custard daughter dentist dessert diagram
doorway dresser earring elephant evening factory festival fireman fishbowl flamingo football freedom furnace
gallery garment giraffe goldfish gorilla grandma greenhouse guardian haircut hairbrush handbag headband highway
holiday homework hurricane internet jackpot jellyfish journal kangaroo keyhole ladybug language lettuce luggage
magazine mailbox mansion marathon meatball mermaid message microwave midnight milkshake mission moonlight mushroom
musician necklace neighbor notebook octagon officer orchestra ostrich painter pajamas panther passport pelican
perfume pharmacy pineapple plumber popcorn postcard printer problem pudding pyramid quarter railway rainfall
raspberry reindeer restaurant sandwich sausage scooter seashell shampoo shoulder sidewalk skeleton snowball
snowman soldier spaghetti stadium starfish station student sunshine surgeon teaspoon theater thermos toaster
toddler tornado tourist treasure triangle trolley trombone uniform vampire vanilla vegetable volcano walkway
wardrobe warrior waterfall weather weekend windmill woodpecker workshop zucchini
""")

NAMES: tuple[str, ...] = _listed("""
Mia Tom Anna Ben Lily Sam Emma Jack Noah Zoe Leo Ruby Max Ella Omar Nina Liam Sara Hugo Ivy Alex Beth Carl Dina
Ezra Fay Gus Hana Ian Jade Kai Lena Milo Nora Owen Pia Rosa Seth Tara Umar Vera Wade Yara Zane
""")
# plural things counted in `word_math`
THINGS: tuple[str, ...] = _listed("""
apples pencils stickers marbles cookies books coins shells stamps balloons cards toys cups hats
oranges candles buttons crayons flowers eggs
""")
CITIES: tuple[str, ...] = _listed("""
Paris London Rome Berlin Madrid Tokyo Cairo Lima Oslo Dublin Vienna Lisbon Athens Prague Sydney Toronto Dallas
Denver Miami Delhi Mumbai Nairobi Quito Bogota Havana Manila Hanoi Warsaw Zurich Geneva
""")


def caps_reward(problem: Problem, completion: str) -> float:
    return exact_text_reward(completion, problem.answer)


def word_math_reward(problem: Problem, completion: str) -> float:
    return last_number_reward(completion, problem.answer)


def json_record_reward(problem: Problem, completion: str) -> float:
    return json_fields_reward(completion, problem.answer)


# generation lengths (SmolLM2 tokens, EOS included) that leave room for the prompted teachers' answers: `caps` up to
# 6 tokens, `word_math`'s "Kim gets 3 more: 4 + 3 = 7." up to 20, `json_record` up to 25
MAX_NEW_TOKENS = {"caps": 16, "word_math": 24, "json_record": 32}


SHORT_WORDS: tuple[str, ...] = tuple(w for w in WORDS if len(w) <= 6)
LONG_WORDS: tuple[str, ...] = tuple(w for w in WORDS if len(w) >= 7)


def _caps_prompt(word: str) -> str:
    return f"Write the word '{word}' in capital letters."


@register_domain(
    "caps", difficulties=(1, 2), verify=caps_reward, alphabet=string.printable,
    max_new_tokens=MAX_NEW_TOKENS["caps"],
    description="'Write the word 'W' in capital letters.' -> W upper-cased; W of 3-6 (d1) or 7-10 (d2) letters",
)
def caps(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = rng.choice(SHORT_WORDS if difficulty == 1 else LONG_WORDS)
    return _caps_prompt(word), word.upper()


def _word_math_prompt(name: str, a: int, b: int, things: str, subtract: bool) -> str:
    """The question, then " Answer with a number.": without it SmolLM2 explains at length and only 2% of its
    samples (temperature 1, 24 tokens) reach the right number, too little for RL to start from; with it, 11%."""
    event = f"gives away {b}" if subtract else f"gets {b} more"
    return f"{name} has {a} {things} and {event}. How many {things} does {name} have now? Answer with a number."


@register_domain(
    "word_math", difficulties=(1, 2), verify=word_math_reward,
    alphabet=string.printable, max_new_tokens=MAX_NEW_TOKENS["word_math"],
    description="one-step word problems, d1 'gets b more' (a + b), d2 'gives away b' (a - b); reward: the last number",
)
def word_math(rng: random.Random, difficulty: int) -> tuple[str, str]:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if difficulty == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return _word_math_prompt(name, a, b, things, subtract=False), str(a + b)
    b = rng.randint(2, 9)
    a = b + rng.randint(1, 12)
    return _word_math_prompt(name, a, b, things, subtract=True), str(a - b)


def _json_prompt(name: str, age: int, city: str | None) -> str:
    if city is None:
        return f'Write a JSON object with the keys "name" and "age" for {name}, who is {age} years old.'
    return (f'Write a JSON object with the keys "name", "age" and "city" for {name}, who is {age} years old and '
            f"lives in {city}.")


def _json_answer(name: str, age: int, city: str | None) -> str:
    record: dict[str, object] = {"name": name, "age": age}
    if city is not None:
        record["city"] = city
    return json.dumps(record)


@register_domain(
    "json_record", difficulties=(1, 2), verify=json_record_reward,
    alphabet=string.printable, max_new_tokens=MAX_NEW_TOKENS["json_record"],
    description="a one-line JSON object with given keys (d1 name, age; d2 + city); reward: fields right, x0.5 in prose",
)
def json_record(rng: random.Random, difficulty: int) -> tuple[str, str]:
    name, age = rng.choice(NAMES), rng.randint(18, 70)
    city = rng.choice(CITIES) if difficulty == 2 else None
    return _json_prompt(name, age, city), _json_answer(name, age, city)


# ------------------------------------------------------------------------------------------- prompted teachers

# Per domain: a system prompt and examples (prompt, answer), rendered as chat turns before the student's prompt:
# [system, user ex1, assistant ex1, ..., user PROMPT]. Example words, names and cities are not in the lists above.
PROMPTED: dict[str, dict[str, object]] = {
    "caps": {
        "system": "You rewrite words in capital letters. Reply with only the rewritten word.",
        "examples": [
            {"prompt": _caps_prompt(w), "answer": w.upper()} for w in ("garden", "hospital", "kite", "lighthouse")
        ],
    },
    "word_math": {
        "system": "You solve short math word problems. Answer in one short sentence with the calculation and its "
                  "result.",
        "examples": [
            # the answer restates the event before the sum ("Kim gets 3 more: 4 + 3 = 7."): with a bare "4 + 3 = 7"
            # or "Kim has 4 + 3 = 7 pens now." the model copies the previous example's operation (0.40 held out);
            # restating it picks the right one (0.66 on 64 held-out prompts)
            {"prompt": _word_math_prompt(name, a, b, things, subtract=sub),
             "answer": f"{name} {f'gives away {b}' if sub else f'gets {b} more'}: {a} {'-' if sub else '+'} {b} = "
                       f"{a - b if sub else a + b}."}
            for name, a, b, things, sub in (("Kim", 4, 3, "pens", False), ("Dan", 11, 5, "mugs", True),
                                            ("Eva", 8, 6, "bowls", False), ("Raj", 13, 4, "forks", True))
        ],
    },
    "json_record": {
        "system": "You write JSON. Reply with only the JSON object, on one line.",
        "examples": [
            {"prompt": _json_prompt("Kim", 25, None), "answer": _json_answer("Kim", 25, None)},
            {"prompt": _json_prompt("Dan", 62, "Seoul"), "answer": _json_answer("Dan", 62, "Seoul")},
        ],
    },
}


def prompted_messages(domain: str, prompt: str) -> list[dict[str, str]]:
    """The chat a prompted teacher of `domain` sees for `prompt`: its system prompt, its examples, then the prompt."""
    spec = PROMPTED[domain]
    messages = [{"role": "system", "content": str(spec["system"])}]
    for ex in spec["examples"]:  # type: ignore[union-attr]
        messages += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]}]
    return [*messages, {"role": "user", "content": prompt}]
