"""Seeded generator of demo training data for a customer-feedback triage fine-tune.

Every example is an alpaca-style record ``{"instruction", "input", "output"}``:

* ``instruction`` is always :data:`INSTRUCTION`;
* ``input`` is a short, made-up customer message (one to three sentences);
* ``output`` is a single line of the form
  ``sentiment: <label> | topic: <label> | summary: <a few lowercase words>``.

The labels are drawn first and the message is then composed to express them,
from templates and slot fillers shared with the summary, so the target always
describes the message. Everything is driven by ``random.Random(seed)``: the same
seed always gives the same records and byte-identical files.

:func:`write_demo_data` also plants a handful of deliberately broken JSONL lines
(see :func:`broken_records`) in the last file, so that a validation step has
something to reject.

Command line::

    python -m loraflow.demo_data OUT_DIR [--n N] [--seed S] [--files F] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import tempfile
from collections.abc import Sequence

__all__ = [
    "INSTRUCTION",
    "OUTPUT_PATTERN",
    "SENTIMENTS",
    "TOPICS",
    "broken_records",
    "generate_examples",
    "main",
    "write_demo_data",
]

INSTRUCTION: str = "Triage this customer message: give its sentiment, topic and a short summary."

OUTPUT_PATTERN: str = (
    r"sentiment: (positive|negative|neutral|mixed) \| "
    r"topic: (delivery|billing|product quality|customer service|account|returns) \| "
    r"summary: [^|\n]+"
)

SENTIMENTS: tuple[str, ...] = ("negative", "positive", "neutral", "mixed")
_SENTIMENT_WEIGHTS: tuple[int, ...] = (40, 30, 15, 15)

TOPICS: tuple[str, ...] = (
    "delivery",
    "billing",
    "product quality",
    "customer service",
    "account",
    "returns",
)

_MIN_WORDS = 15
_MAX_WORDS = 60

# ---------------------------------------------------------------------------
# Slot fillers
# ---------------------------------------------------------------------------

# name, plural?, issues [(message phrase, summary phrase)], praise [(message, summary)]
# Message phrases are verb phrases that agree with the product as subject.
_PRODUCTS: tuple[tuple[str, bool, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    (
        "kettle",
        False,
        (
            ("leaks from the base", "leaks from the base"),
            ("switches itself off before the water boils", "switches off before boiling"),
            ("has a lid that won't stay shut", "lid won't stay shut"),
            ("makes the water taste of plastic", "makes water taste of plastic"),
        ),
        (
            ("boils really quickly", "boils quickly"),
            ("is nice and quiet", "is nice and quiet"),
            ("looks great on the worktop", "looks great"),
        ),
    ),
    (
        "wireless headphones",
        True,
        (
            ("keep cutting out", "keep cutting out"),
            ("won't hold a charge for more than an hour", "have poor battery life"),
            ("hurt my ears after twenty minutes", "are uncomfortable"),
            ("only play sound on the left side", "only play on one side"),
        ),
        (
            ("sound amazing", "sound amazing"),
            ("are really comfortable", "are comfortable"),
            ("last for days on one charge", "have long battery life"),
        ),
    ),
    (
        "desk lamp",
        False,
        (
            ("flickers constantly", "flickers constantly"),
            ("has an arm that won't stay in place", "arm won't stay in place"),
            ("gets very hot to the touch", "gets very hot"),
        ),
        (
            ("gives a lovely warm light", "gives warm light"),
            ("is really sturdy", "is sturdy"),
            ("has great brightness settings", "has good brightness settings"),
        ),
    ),
    (
        "running shoes",
        True,
        (
            ("started coming apart at the sole", "coming apart at the sole"),
            ("gave me blisters straight away", "cause blisters"),
            ("squeak on every step", "squeak"),
            ("are a full size smaller than labelled", "run a size small"),
        ),
        (
            ("are super comfortable", "are comfortable"),
            ("have great grip", "have great grip"),
            ("are really light", "are light"),
        ),
    ),
    (
        "phone case",
        False,
        (
            ("cracked at one corner", "cracked at a corner"),
            ("doesn't fit my phone properly", "fits poorly"),
            ("has turned yellow", "turned yellow"),
        ),
        (
            ("fits perfectly", "fits perfectly"),
            ("has survived several drops", "survived drops"),
            ("feels really solid", "feels solid"),
        ),
    ),
    (
        "coffee grinder",
        False,
        (
            ("grinds really unevenly", "grinds unevenly"),
            ("jammed", "jammed"),
            ("is incredibly loud", "is very loud"),
        ),
        (
            ("gives a lovely even grind", "grinds evenly"),
            ("is easy to clean", "is easy to clean"),
        ),
    ),
    (
        "hiking backpack",
        False,
        (
            ("has a strap that ripped", "strap ripped"),
            ("has a zip that keeps splitting", "zip keeps splitting"),
            ("isn't waterproof at all", "is not waterproof"),
        ),
        (
            ("is really comfortable on long walks", "is comfortable on long walks"),
            ("has loads of space", "has lots of space"),
        ),
    ),
    (
        "yoga mat",
        False,
        (
            ("is peeling at the edges", "peeling at the edges"),
            ("smells strongly of chemicals", "has strong chemical smell"),
            ("slides around on the floor", "slips on the floor"),
        ),
        (
            ("has great grip", "has great grip"),
            ("is nice and thick", "is nice and thick"),
        ),
    ),
    (
        "blender",
        False,
        (
            ("leaks around the jug", "leaks around the jug"),
            ("can't crush ice", "can't crush ice"),
            ("smells of burning when I use it", "smells of burning"),
        ),
        (
            ("makes perfectly smooth smoothies", "blends smoothly"),
            ("is really powerful", "is powerful"),
        ),
    ),
    (
        "smartwatch",
        False,
        (
            ("keeps losing the connection to my phone", "loses phone connection"),
            ("has a battery that barely lasts a day", "has poor battery life"),
            ("already has a scratched screen", "screen scratched"),
        ),
        (
            ("tracks my runs accurately", "tracks runs accurately"),
            ("has a great battery", "has great battery life"),
        ),
    ),
    (
        "bluetooth speaker",
        False,
        (
            ("crackles at higher volumes", "crackles at high volume"),
            ("won't pair with my laptop", "won't pair"),
            ("turns itself off randomly", "turns off randomly"),
        ),
        (
            ("is surprisingly loud", "is surprisingly loud"),
            ("has really rich bass", "has rich bass"),
        ),
    ),
    (
        "air fryer",
        False,
        (
            ("has a non-stick coating that is flaking off", "coating flaking off"),
            ("cooks really unevenly", "cooks unevenly"),
            ("fills the kitchen with smoke", "produces smoke"),
        ),
        (
            ("makes the crispiest chips", "cooks crispy chips"),
            ("is really easy to clean", "is easy to clean"),
        ),
    ),
    (
        "office chair",
        False,
        (
            ("keeps sinking down while I sit on it", "keeps sinking"),
            ("creaks every time I move", "creaks"),
            ("has a wheel that snapped off", "wheel snapped off"),
        ),
        (
            ("has really helped my back", "helps back pain"),
            ("is very comfortable", "is comfortable"),
        ),
    ),
    (
        "water bottle",
        False,
        (
            ("leaks in my bag", "leaks"),
            ("doesn't keep drinks cold", "doesn't keep drinks cold"),
            ("has a lid that cracked", "lid cracked"),
        ),
        (
            ("keeps water cold all day", "keeps water cold"),
            ("doesn't leak at all", "doesn't leak"),
        ),
    ),
    (
        "electric toothbrush",
        False,
        (
            ("won't charge anymore", "won't charge"),
            ("rattles inside", "rattles"),
            ("stopped working", "stopped working"),
        ),
        (
            ("leaves my teeth feeling really clean", "cleans well"),
            ("has a battery that lasts for weeks", "has long battery life"),
        ),
    ),
    (
        "rain jacket",
        False,
        (
            ("lets water through at the seams", "leaks at the seams"),
            ("has a zip that broke", "zip broke"),
            ("lost its colour after one wash", "faded after one wash"),
        ),
        (
            ("keeps me completely dry", "keeps me dry"),
            ("is light enough to fold into a pocket", "packs small"),
        ),
    ),
    (
        "bed sheets",
        True,
        (
            ("pilled after one wash", "pilled after one wash"),
            ("shrank in the wash", "shrank in the wash"),
            ("feel rough and scratchy", "feel rough"),
        ),
        (
            ("are incredibly soft", "are very soft"),
            ("wash really well", "wash well"),
        ),
    ),
    (
        "laptop stand",
        False,
        (
            ("wobbles when I type", "wobbles"),
            ("scratched the bottom of my laptop", "scratched the laptop"),
            ("has a hinge that won't lock", "hinge won't lock"),
        ),
        (
            ("is really stable", "is stable"),
            ("has helped my posture", "improved posture"),
        ),
    ),
)

_WAITS = (
    "two days",
    "three days",
    "four days",
    "five days",
    "a week",
    "over a week",
    "ten days",
    "nearly two weeks",
    "two weeks",
    "three weeks",
)
_SHORT_WAITS = ("a day", "two days", "48 hours", "24 hours", "three days")
_USED = (
    "a few days",
    "three days",
    "a week",
    "two weeks",
    "three weeks",
    "a month",
    "six weeks",
    "two months",
)
_SHORT_TIMES = ("ten minutes", "fifteen minutes", "twenty minutes", "half an hour", "an hour")
_TIMES = ("three", "four", "five", "six")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_AGENTS = (
    "Sam",
    "Priya",
    "Tom",
    "Aisha",
    "Marco",
    "Lena",
    "Jonas",
    "Grace",
    "Omar",
    "Chloe",
    "Dev",
    "Hannah",
)
_COURIERS = ("DPD", "UPS", "Evri", "Royal Mail", "DHL", "The courier", "The driver")
_DRIVERS = (
    "The DPD driver",
    "The UPS driver",
    "The Evri courier",
    "The Royal Mail postman",
    "The DHL driver",
    "The delivery driver",
)
_LEFT_AT = (
    "with a neighbour I've never met",
    "at the wrong house",
    "outside the house next door",
    "on an open porch",
    "behind the bins",
)
_REGIONS = (
    "the Scottish Highlands",
    "Northern Ireland",
    "the Isle of Wight",
    "the Channel Islands",
    "Ireland",
    "rural Wales",
    "Shetland",
    "the Isles of Scilly",
)
_CODE_WORDS = ("SAVE", "WELCOME", "SPRING", "SUMMER", "FREESHIP", "VIP", "THANKYOU")
_ERROR_CODES = ("500", "502", "503", "403", "404")
_CURRENCIES = ("£", "$", "€")

_GREETINGS = (
    "Hi,",
    "Hello,",
    "Hi there,",
    "Hey,",
    "Good morning,",
    "Hello team,",
    "Dear customer services,",
    "Hiya,",
    "Good afternoon,",
)
_CLOSERS: dict[str, tuple[str, ...]] = {
    "negative": (
        "Please sort this out as soon as possible.",
        "I'd like this fixed or my money back.",
        "Really not happy about this.",
        "Very disappointed, to be honest.",
        "Can someone please get back to me?",
        "This is not good enough.",
        "I expect a proper answer this time.",
    ),
    "positive": (
        "Thanks so much!",
        "Will definitely be ordering again.",
        "Keep up the good work.",
        "Very happy customer here.",
        "Just wanted to pass that on.",
        "Thank you!",
    ),
    "neutral": (
        "Thanks in advance.",
        "Thanks for your help.",
        "Would appreciate a quick answer.",
        "Kind regards.",
        "Many thanks.",
        "Cheers.",
    ),
    "mixed": (
        "Would appreciate it if you could look into it.",
        "Overall okay, but it could be better.",
        "Not the end of the world, but worth knowing.",
        "Hope you can sort the rest out.",
        "Just thought you should know.",
    ),
}

# Common misspellings used for the occasional typo.
_MISSPELLINGS = (
    ("received", "recieved"),
    ("definitely", "definately"),
    ("really", "realy"),
    ("because", "becuase"),
    ("address", "adress"),
    ("which", "wich"),
    ("until", "untill"),
    ("arrived", "arived"),
    ("already", "allready"),
    ("account", "acount"),
    ("delivery", "delivary"),
    ("charged", "chraged"),
    ("disappointed", "dissapointed"),
    ("tomorrow", "tommorow"),
)

# ---------------------------------------------------------------------------
# Templates: (message template, summary template) per topic and sentiment.
# Slots are filled from the same context, so the summary follows the message.
# ---------------------------------------------------------------------------

_Template = tuple[str, str]

_TEMPLATES: dict[str, dict[str, tuple[_Template, ...]]] = {
    "delivery": {
        "negative": (
            (
                (
                    "My {order} for the {product} was supposed to arrive on {weekday} but it still "
                    "hasn't turned up after {wait}. The tracking page hasn't updated at all."
                ),
                "{product} order still not delivered after {wait}",
            ),
            (
                ("The {product} finally arrived {late_days} days late and the box was completely crushed."),
                "{product} arrived {late_days} days late in a crushed box",
            ),
            (
                (
                    "{Courier} left my parcel {left_at} and now nobody knows where it is. It's the "
                    "{product} from {order}."
                ),
                "parcel with {product} left in wrong place and lost",
            ),
            (
                (
                    "Tracking for {order} has said 'out for delivery' for {wait} now. I paid for "
                    "next day shipping and I still have no {product}."
                ),
                "paid next day, {product} stuck out for delivery",
            ),
            (
                ("I got an empty box instead of my {product}. The seal on the package had been ripped open."),
                "package arrived empty, {product} missing",
            ),
            (
                (
                    "Only half of my {order} turned up. The {product} is missing and there was no "
                    "note about a second parcel."
                ),
                "{product} missing from partly delivered order",
            ),
            (
                (
                    "Delivery was marked as completed on {weekday} but nothing arrived at my "
                    "address. Where is my {product}?"
                ),
                "order marked delivered but {product} never arrived",
            ),
        ),
        "positive": (
            (
                ("My {product} arrived a day earlier than promised and it was packed really carefully."),
                "{product} arrived early and well packed",
            ),
            (
                (
                    "Super fast delivery, I ordered the {product} on {weekday} evening and it was "
                    "here the next morning."
                ),
                "fast next day delivery of {product}",
            ),
            (
                (
                    "{Driver} was really friendly and even waited while I came down the stairs. "
                    "Great service for {order}."
                ),
                "praises friendly driver who delivered the order",
            ),
            (
                (
                    "Just wanted to say the tracking updates were spot on and the {product} came "
                    "exactly in the time slot you gave me."
                ),
                "accurate tracking, {product} delivered on time",
            ),
            (
                (
                    "Really impressed that {order} arrived within {short_wait} even though I only "
                    "chose free shipping for the {product}."
                ),
                "free shipping {product} order arrived within {short_wait}",
            ),
        ),
        "neutral": (
            (
                (
                    "Could you tell me when {order} is expected to be delivered? The tracking page "
                    "just says 'processing'."
                ),
                "asks for expected delivery date of order",
            ),
            (
                (
                    "I'm moving house next week. Is it possible to change the delivery address for "
                    "the {product} I ordered on {weekday}?"
                ),
                "wants to change delivery address for {product}",
            ),
            (
                ("Do you deliver the {product} to {region}, and if so how long does it usually take?"),
                "asks about delivery times to {region}",
            ),
            (
                ("Can I choose a specific delivery day for my {product}? I'm only home on {weekday}s."),
                "asks to choose delivery day for {product}",
            ),
            (
                (
                    "Will {order} come in one parcel or several? I just need to know whether to "
                    "wait in on {weekday}."
                ),
                "asks if order ships as one parcel",
            ),
        ),
        "mixed": (
            (
                ("The {product} itself {praise}, but it took {wait} longer than promised to get here."),
                "{product} good but delivered {wait} late",
            ),
            (
                (
                    "Delivery of {order} was quick, however the box was dented and the {product} "
                    "has a small scratch on it."
                ),
                "fast delivery but {product} arrived scratched",
            ),
            (
                (
                    "{Courier} came early which was great, but the parcel was left out in the rain "
                    "and the {product} box was soaked."
                ),
                "early delivery but parcel left out in the rain",
            ),
            (
                (
                    "Tracking was clear and easy to follow, but the {product} was delivered to a "
                    "neighbour on {weekday} instead of to me."
                ),
                "clear tracking but {product} delivered to neighbour",
            ),
        ),
    },
    "billing": {
        "negative": (
            (
                (
                    "I've been charged twice for {order}. Two payments of {amount} came out of my "
                    "account on {weekday}."
                ),
                "charged twice {amount} for the same order",
            ),
            (
                (
                    "The discount code {code} didn't apply at checkout, so I paid full price for "
                    "the {product}."
                ),
                "discount code not applied to {product} purchase",
            ),
            (
                ("I was promised a refund of {amount} {wait} ago and it still hasn't reached my card."),
                "promised refund of {amount} not received after {wait}",
            ),
            (
                ("You charged me {amount} but the price on the website for the {product} said {amount2}."),
                "charged {amount} instead of listed price {amount2}",
            ),
            (
                (
                    "There's a payment of {amount} on my statement from you that I don't recognise "
                    "at all. I haven't ordered anything since {month}."
                ),
                "unrecognised charge of {amount} on statement",
            ),
            (
                ("My subscription was cancelled in {month} but you're still taking {amount} every month."),
                "still charged {amount} monthly after cancelling subscription",
            ),
        ),
        "positive": (
            (
                (
                    "Thank you for honouring the price match on the {product}, the {diff} "
                    "difference was refunded within a day."
                ),
                "price match on {product} refunded quickly",
            ),
            (
                ("Checkout was simple and the invoice for {order} arrived in my inbox straight away."),
                "smooth checkout and instant invoice",
            ),
            (
                (
                    "I noticed I'd been overcharged on my {product} and you refunded the {diff} "
                    "before I even had to ask, brilliant."
                ),
                "overcharge of {diff} refunded without asking",
            ),
            (
                (
                    "Love that I could split the {amount} payment for the {product} into three "
                    "instalments with no fees."
                ),
                "happy with fee-free instalments for {product}",
            ),
        ),
        "neutral": (
            (
                ("Could you send me a VAT invoice for {order}? I need it for my expenses claim for {month}."),
                "requests vat invoice for order",
            ),
            (
                (
                    "How do I change the card that's saved on my account for payments? The current "
                    "one expires in {month}."
                ),
                "asks how to update saved payment card",
            ),
            (
                "Do you accept PayPal or bank transfer for larger orders like the {product}?",
                "asks about accepted payment methods",
            ),
            (
                ("I was charged {amount} for {order}; can you confirm whether that includes shipping?"),
                "asks if {amount} charge includes shipping",
            ),
            (
                (
                    "When exactly will my card be charged for a pre-order of the {product}, at "
                    "checkout or when it ships?"
                ),
                "asks when pre-order payment is taken",
            ),
        ),
        "mixed": (
            (
                (
                    "The refund for the {product} did come through, but it was {diff} short of what "
                    "I actually paid."
                ),
                "refund received but {diff} short",
            ),
            (
                (
                    "Prices are great, but I was charged {amount} for shipping on {order} which "
                    "wasn't shown until the last step."
                ),
                "good prices but hidden {amount} shipping fee",
            ),
            (
                (
                    "Your team fixed the double charge on {order} quickly, although it took {times} "
                    "emails to get anyone to look at it."
                ),
                "double charge fixed but took {times} emails",
            ),
            (
                (
                    "Happy with the {product}, but the invoice shows the wrong billing address and "
                    "I can't edit it."
                ),
                "happy with {product} but invoice address wrong",
            ),
        ),
    },
    "product quality": {
        "negative": (
            (
                "The {product} {issue} after only {used}. For the price I expected much better.",
                "{product} {issue_s} after {used}",
            ),
            (
                "My new {product} {issue}. Really disappointed with the quality for {amount}.",
                "new {product} {issue_s}",
            ),
            (
                "Bought the {product} {used} ago and {it} {issue}. Not acceptable.",
                "{product} {issue_s} within {used}",
            ),
            (
                ("Honestly the worst {product} I've owned. {It} {issue} and the finish looks cheap."),
                "poor quality {product} {issue_s}",
            ),
            (
                (
                    "This is my second order of the {product} and once again {it} {issue}. I don't "
                    "think I'll buy from you again."
                ),
                "second {product} {issue_s} again",
            ),
        ),
        "positive": (
            (
                "Absolutely love the {product}! {It} {praise} and the quality is great.",
                "{product} {praise_s} and great quality",
            ),
            (
                ("I've been using the {product} for {used} now and {it} {praise}. Worth every penny."),
                "{product} {praise_s} after {used} of use",
            ),
            (
                (
                    "Really pleased with my {product}, {it} {praise}. Better than the expensive "
                    "brand I had before."
                ),
                "very pleased, {product} {praise_s}",
            ),
            (
                (
                    "The build quality of the {product} is excellent and {it} {praise}. Great value "
                    "at {amount}."
                ),
                "excellent build quality, {product} {praise_s}",
            ),
        ),
        "neutral": (
            (
                (
                    "{Does} the {product} come with a warranty, and if so how long is it? I bought "
                    "mine in {month}."
                ),
                "asks about warranty on {product}",
            ),
            (
                ("What are the exact dimensions of the {product}? I want to check the size before ordering."),
                "asks for {product} dimensions",
            ),
            (
                (
                    "Are replacement parts available for the {product}, or do I have to replace the "
                    "whole thing?"
                ),
                "asks about replacement parts for {product}",
            ),
            (
                (
                    "How should I clean the {product}? There were no care instructions in the box "
                    "with {order}."
                ),
                "asks how to clean {product}",
            ),
            (
                (
                    "{Is} the {product} you sell the {year} model or the older version? The listing "
                    "doesn't say."
                ),
                "asks which model year {product} is",
            ),
        ),
        "mixed": (
            (
                "The {product} {praise}, but {it} {issue}.",
                "{product} {praise_s} but {issue_s}",
            ),
            (
                ("Mostly happy with the {product}: {it} {praise}. Only complaint is that {it} {issue}."),
                "{product} {praise_s} but {issue_s}",
            ),
            (
                "Good value for {amount}, although after {used} the {product} {issue}.",
                "{product} decent value but {issue_s}",
            ),
            (
                "I like the design of the {product}, shame that {it} {issue}.",
                "likes {product} design but {issue_s}",
            ),
        ),
    },
    "customer service": {
        "negative": (
            (
                ("I've been on hold for {minutes} minutes twice this week and nobody has picked up."),
                "on hold {minutes} minutes, nobody answered",
            ),
            (
                (
                    "I've emailed about {order} {times} times in the last {wait} and haven't had a "
                    "single reply."
                ),
                "no reply to {times} emails about order",
            ),
            (
                (
                    "The agent I spoke to, {agent}, was rude and hung up on me when I asked about "
                    "my {product}."
                ),
                "rude agent hung up during {product} query",
            ),
            (
                (
                    "Your live chat keeps closing before anyone answers. I've tried {times} times "
                    "now about my {product}."
                ),
                "live chat closes before an agent responds",
            ),
            (
                ("I was promised a call back {wait} ago and nobody ever rang. Terrible support for {order}."),
                "promised call back never happened",
            ),
            (
                (
                    "Every person I talk to gives me a different answer about {order}. Nobody seems "
                    "to know what's going on."
                ),
                "inconsistent answers from support about order",
            ),
        ),
        "positive": (
            (
                (
                    "{agent} on your chat team was amazing and sorted out my problem with the "
                    "{product} in five minutes."
                ),
                "agent {agent} quickly solved {product} problem",
            ),
            (
                (
                    "Huge thanks to {agent} who called me back on {weekday} exactly when promised "
                    "and fixed everything."
                ),
                "praises {agent} for prompt call back",
            ),
            (
                (
                    "Your support team replied within {short_time} about my {product} and were so "
                    "friendly. Really refreshing."
                ),
                "support replied within {short_time}, very friendly",
            ),
            (
                (
                    "I was worried about {order} but the person on the phone was patient and "
                    "explained everything clearly."
                ),
                "patient phone support explained order clearly",
            ),
        ),
        "neutral": (
            (
                (
                    "What are your customer service opening hours on {weekday}s? I have a question "
                    "about my {product}."
                ),
                "asks about support opening hours",
            ),
            (
                ("Is there a phone number I can call instead of using the chat? It's about {order}."),
                "asks for support phone number",
            ),
            (
                (
                    "I have a reference number from {agent} on the chat; should I quote it when I "
                    "email about {order}?"
                ),
                "asks whether to quote chat reference number",
            ),
            (
                ("Can someone from your team contact me about {order}? Email is the best way to reach me."),
                "requests email contact about order",
            ),
        ),
        "mixed": (
            (
                (
                    "{agent} was very polite on the phone, but my issue with the {product} still "
                    "isn't fixed after {wait}."
                ),
                "polite agent but {product} issue still unresolved",
            ),
            (
                (
                    "Your chat replies quickly, but the answers feel copied and pasted and don't "
                    "help with my {product}."
                ),
                "fast chat but unhelpful template answers",
            ),
            (
                ("Support did eventually fix {order}, but it took {times} calls and {wait} to get there."),
                "issue fixed but took {times} calls",
            ),
            (
                (
                    "The agent was friendly and apologised, though I still had to wait {minutes} "
                    "minutes on hold first."
                ),
                "friendly agent but {minutes} minute hold",
            ),
        ),
    },
    "account": {
        "negative": (
            (
                (
                    "I can't log in to my account. Every time I try it says my password is wrong, "
                    "even after resetting it {times} times."
                ),
                "cannot log in even after password reset",
            ),
            (
                (
                    "The password reset email never arrives. I've tried {times} times since "
                    "{weekday} and checked my spam folder."
                ),
                "password reset email never arrives",
            ),
            (
                (
                    "My account has been locked for {wait} and nobody will tell me why. I have an "
                    "open order on it, {order}."
                ),
                "account locked for {wait} without explanation",
            ),
            (
                (
                    "Someone changed the email address on my account on {weekday} without my "
                    "permission. I'm really worried about this."
                ),
                "account email changed without permission",
            ),
            (
                ("Your app keeps logging me out every few minutes, it's impossible to check on {order}."),
                "app keeps logging user out",
            ),
            (
                (
                    "I deleted my saved address and now the account page just shows 'error "
                    "{error_code}' every time."
                ),
                "account page shows error {error_code}",
            ),
        ),
        "positive": (
            (
                (
                    "The new account page is so much easier to use, I found {order} and the invoice "
                    "in seconds."
                ),
                "new account page easy to use",
            ),
            (
                (
                    "Setting up two-factor login took less than a minute. Nice to see you take "
                    "security seriously."
                ),
                "quick and easy two-factor setup",
            ),
            (
                "Love that I can see all my past orders and reorder the {product} with one click.",
                "likes one-click reorder of {product}",
            ),
            (
                (
                    "Resetting my password was quick and painless, I was back in and checking "
                    "{order} within a minute."
                ),
                "password reset quick and painless",
            ),
        ),
        "neutral": (
            (
                (
                    "How do I change the email address on my account? The old one I signed up with "
                    "in {month} no longer works."
                ),
                "asks how to change account email",
            ),
            (
                (
                    "Can I merge my two accounts? I accidentally made a second one when I ordered "
                    "the {product}."
                ),
                "asks to merge two accounts",
            ),
            (
                ("Please can you close my account and delete my personal data. My last order was {order}."),
                "requests account closure and data deletion",
            ),
            (
                "Where can I update my saved delivery address in the app? I moved in {month}.",
                "asks where to update saved address",
            ),
            (
                "Is it possible to order the {product} as a guest without creating an account?",
                "asks about guest checkout",
            ),
        ),
        "mixed": (
            (
                ("Love the new app design, but since the update on {weekday} I can't log in on my phone."),
                "likes new app but cannot log in",
            ),
            (
                ("Password reset worked in the end, but it took {times} attempts for the email to arrive."),
                "password reset worked after {times} attempts",
            ),
            (
                (
                    "The account dashboard is nice, though my order history only goes back to "
                    "{month} and older orders are missing."
                ),
                "nice dashboard but order history incomplete",
            ),
            (
                (
                    "Two-factor login is a good idea, but the codes often arrive {late_minutes} "
                    "minutes too late to use."
                ),
                "likes two-factor but codes arrive late",
            ),
        ),
    },
    "returns": {
        "negative": (
            (
                ("I sent the {product} back {wait} ago and still haven't received my refund of {amount}."),
                "no refund for returned {product} after {wait}",
            ),
            (
                (
                    "The returns portal won't let me select {order}, it just says 'not eligible' "
                    "even though it's within {return_days} days."
                ),
                "returns portal rejects eligible order",
            ),
            (
                "I requested a return label for the {product} {wait} ago and it never came.",
                "return label for {product} never arrived",
            ),
            (
                (
                    "You've refused my return because the box was opened. How else was I meant to "
                    "check the {product}?"
                ),
                "return of opened {product} refused",
            ),
            (
                "I had to pay {amount} to send back the faulty {product}. That should be free.",
                "charged {amount} to return faulty {product}",
            ),
        ),
        "positive": (
            (
                (
                    "Returning the {product} was so easy, I printed the label, dropped it off and "
                    "the refund came in {short_wait}."
                ),
                "easy return of {product} with quick refund",
            ),
            (
                (
                    "Thanks for the hassle-free exchange, the new {product} arrived before I'd even "
                    "posted the original back."
                ),
                "hassle-free exchange for {product}",
            ),
            (
                (
                    "Really appreciate the free return collection, the driver picked up the "
                    "{product} from my door on {weekday}."
                ),
                "free return collection for {product}",
            ),
            (
                (
                    "The refund for my returned {product} was already in my account {short_wait} "
                    "after you received it."
                ),
                "fast refund for returned {product}",
            ),
        ),
        "neutral": (
            (
                "What is your returns policy for items bought in a sale, like the {product}?",
                "asks about returns policy for sale items",
            ),
            (
                "Can I return the {product} to a store or does it have to be posted back?",
                "asks how to return {product}",
            ),
            (
                ("I'd like to exchange the {product} from {order} for a different colour. How do I do that?"),
                "wants to exchange {product} for different colour",
            ),
            (
                "How long do I have to return {order}? The {product} was a gift.",
                "asks about return window for gift",
            ),
            (
                (
                    "Do I need the original packaging to send back the {product}? I threw the box "
                    "away on {weekday}."
                ),
                "asks if original packaging needed for return",
            ),
        ),
        "mixed": (
            (
                ("The return process was simple, but the refund for the {product} took {wait} to show up."),
                "easy return but slow {product} refund",
            ),
            (
                (
                    "Collection was easy, although you only refunded {amount} of the {amount2} I "
                    "paid for the {product}."
                ),
                "easy collection but only partial refund",
            ),
            (
                (
                    "Staff in store were friendly about the return, but they could only offer store "
                    "credit for the {product}."
                ),
                "friendly return but only store credit offered",
            ),
        ),
    },
}


def _money(rng: random.Random, currency: str, low: int, high: int) -> str:
    pence = rng.choice(("99", "49", "00", "95", "50"))
    return f"{currency}{rng.randint(low, high)}.{pence}"


def _order_ref(rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return f"order #{rng.randint(10000, 999999)}"
    if style == 1:
        return f"order ORD-{rng.randint(100000, 999999)}"
    if style == 2:
        return f"order number {rng.randint(1000000, 9999999)}"
    letter = rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ")
    return f"order {letter}{rng.randint(1000, 99999)}"


def _slots(rng: random.Random) -> dict[str, str]:
    """Draw one value for every template slot."""
    name, plural, issues, praises = rng.choice(_PRODUCTS)
    issue, issue_s = rng.choice(issues)
    praise, praise_s = rng.choice(praises)
    currency = rng.choice(_CURRENCIES)
    amount = _money(rng, currency, 8, 180)
    amount2 = amount
    while amount2 == amount:
        amount2 = _money(rng, currency, 8, 180)
    return {
        "product": name,
        "issue": issue,
        "issue_s": issue_s,
        "praise": praise,
        "praise_s": praise_s,
        "It": "They" if plural else "It",
        "it": "they" if plural else "it",
        "Is": "Are" if plural else "Is",
        "Does": "Do" if plural else "Does",
        "order": _order_ref(rng),
        "wait": rng.choice(_WAITS),
        "short_wait": rng.choice(_SHORT_WAITS),
        "used": rng.choice(_USED),
        "late_days": str(rng.randint(2, 12)),
        "minutes": str(rng.randint(20, 95)),
        "late_minutes": str(rng.randint(3, 15)),
        "short_time": rng.choice(_SHORT_TIMES),
        "times": rng.choice(_TIMES),
        "weekday": rng.choice(_WEEKDAYS),
        "month": rng.choice(_MONTHS),
        "year": str(rng.randint(2023, 2026)),
        "agent": rng.choice(_AGENTS),
        "Courier": rng.choice(_COURIERS),
        "Driver": rng.choice(_DRIVERS),
        "left_at": rng.choice(_LEFT_AT),
        "region": rng.choice(_REGIONS),
        "code": f"{rng.choice(_CODE_WORDS)}{rng.choice((5, 10, 15, 20, 25))}",
        "error_code": rng.choice(_ERROR_CODES),
        "return_days": str(rng.choice((14, 28, 30, 60))),
        "amount": amount,
        "amount2": amount2,
        "diff": _money(rng, currency, 2, 30),
    }


def _word_count(text: str) -> int:
    return len(text.split())


def _keeps_capital(word: str) -> bool:
    """True when a sentence-initial word should stay capitalised after a greeting."""
    if word == "I" or word.startswith("I'"):
        return True
    bare = word.rstrip(",.!?:;")
    return bare in _AGENTS or bare in {"DPD", "UPS", "Evri", "Royal", "DHL", "VAT", "PayPal"}


def _join_greeting(greeting: str, body: str) -> str:
    first = body.split(" ", 1)[0]
    if not _keeps_capital(first):
        body = body[:1].lower() + body[1:]
    return f"{greeting} {body}"


def _add_typo(rng: random.Random, text: str) -> str:
    present = [pair for pair in _MISSPELLINGS if pair[0] in text]
    if present and rng.random() < 0.5:
        right, wrong = rng.choice(present)
        return text.replace(right, wrong, 1)
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randint(1, len(word) - 3)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _add_noise(rng: random.Random, text: str, sentiment: str) -> str:
    """Occasional human touches: typos, emphatic punctuation, all-lowercase typing."""
    if rng.random() < 0.07:
        text = _add_typo(rng, text)
    if sentiment in ("negative", "positive") and text.endswith(".") and rng.random() < 0.18:
        text = text[:-1] + rng.choice(("!", "!", "!!", "!!!"))
    elif text.endswith(".") and rng.random() < 0.04:
        text = text[:-1]
    if rng.random() < 0.07:
        text = text.lower()
    return text


def _clean_summary(summary: str) -> str:
    summary = " ".join(summary.lower().replace("|", "/").split())
    return summary.rstrip(" .")


def _compose(rng: random.Random, topic: str, sentiment: str) -> tuple[str, str]:
    """Compose a message expressing ``topic`` and ``sentiment``, plus its summary."""
    templates = _TEMPLATES[topic][sentiment]
    message = summary = ""
    for _ in range(64):
        ctx = _slots(rng)
        message_t, summary_t = rng.choice(templates)
        body = message_t.format(**ctx)
        summary = summary_t.format(**ctx)
        greeting = rng.choice(_GREETINGS) if rng.random() < 0.45 else ""
        closer = rng.choice(_CLOSERS[sentiment]) if rng.random() < 0.55 else ""
        if _word_count(body) + _word_count(greeting) + _word_count(closer) < _MIN_WORDS:
            greeting = greeting or rng.choice(_GREETINGS)
            closer = closer or rng.choice(_CLOSERS[sentiment])
        message = _join_greeting(greeting, body) if greeting else body
        if closer:
            message = f"{message} {closer}"
        if _MIN_WORDS <= _word_count(message) <= _MAX_WORDS:
            break
    return _add_noise(rng, message, sentiment), _clean_summary(summary)


def _format_output(sentiment: str, topic: str, summary: str) -> str:
    return f"sentiment: {sentiment} | topic: {topic} | summary: {summary}"


def _make_example(rng: random.Random) -> dict[str, str]:
    sentiment = rng.choices(SENTIMENTS, weights=_SENTIMENT_WEIGHTS)[0]
    topic = rng.choice(TOPICS)
    message, summary = _compose(rng, topic, sentiment)
    return {
        "instruction": INSTRUCTION,
        "input": message,
        "output": _format_output(sentiment, topic, summary),
    }


def generate_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Return ``n`` valid triage examples, deterministic for ``seed``.

    Labels are drawn first (sentiment roughly 40% negative, 30% positive, 15% neutral,
    15% mixed; topics uniform), then a message and summary are composed to match them.
    Inputs are distinct within one call (a repeated message is drawn again), so the
    only exact duplicates in the demo files are the ones planted by
    :func:`broken_records`. Examples are generated one after another from
    ``random.Random(seed)``, so the first ``k`` examples are the same for any ``n >= k``.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    examples: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts_left = 50 * n + 1000
    while len(examples) < n:
        if attempts_left == 0:
            raise RuntimeError(f"could not compose {n} distinct examples")
        attempts_left -= 1
        example = _make_example(rng)
        if example["input"] in seen:
            continue
        seen.add(example["input"])
        examples.append(example)
    return examples


def _dumps(record: object) -> str:
    return json.dumps(record, ensure_ascii=False)


def broken_records(seed: int = 0) -> list[str]:
    """Return eight deliberately broken JSONL lines (strings without newlines).

    In order: an empty ``output``; an ``input`` of only whitespace; an oversize
    ``input`` (one message pasted until it exceeds 4,000 characters); a record missing
    the ``output`` key; a record whose ``output`` is a number; a truncated, malformed
    JSON object; a record whose ``output`` ignores the required format; and an exact
    duplicate of the first record ``generate_examples(n, seed)`` yields for any ``n >= 1``.
    """
    rng = random.Random(f"loraflow-demo-broken-{seed}")
    pool = [_make_example(rng) for _ in range(6)]

    empty_output = dict(pool[0], output="")
    blank_input = dict(pool[1], input=rng.choice(("   ", " \t  ", "\t\t", "    \t ")))
    message = pool[2]["input"]
    copies = 4000 // (len(message) + 1) + 2
    oversize = dict(pool[2], input=" ".join([message] * copies))
    missing_output = {"instruction": INSTRUCTION, "input": pool[3]["input"]}
    numeric_output = dict(pool[4], output=rng.choice((0, 1, 3, 42)))
    full_line = _dumps(pool[5])
    truncated = full_line[: len(full_line) * 2 // 3]
    sentiment = pool[0]["output"].split(" | ", 1)[0].split(": ", 1)[1]
    off_format = dict(pool[1], output=f"{sentiment.capitalize()} - see message above")
    duplicate = generate_examples(1, seed)[0]

    lines = [
        _dumps(empty_output),
        _dumps(blank_input),
        _dumps(oversize),
        _dumps(missing_output),
        _dumps(numeric_output),
        truncated,
        _dumps(off_format),
        _dumps(duplicate),
    ]
    return [line.replace("\n", " ") for line in lines]


def _file_names(files: int) -> list[str]:
    if files == 2:
        return ["feedback-2026-10.jsonl", "feedback-2026-11.jsonl"]
    return [f"feedback-part-{i:02d}.jsonl" for i in range(1, files + 1)]


def _plan(n: int, seed: int, files: int) -> list[tuple[str, list[str], int, int]]:
    """Lay out the files: (name, lines, valid count, broken count) for each."""
    if files < 1:
        raise ValueError(f"files must be at least 1, got {files}")
    valid = [_dumps(record) for record in generate_examples(n, seed)]
    base, extra = divmod(n, files)
    plan: list[tuple[str, list[str], int, int]] = []
    start = 0
    for index, name in enumerate(_file_names(files)):
        size = base + (1 if index < extra else 0)
        plan.append((name, valid[start : start + size], size, 0))
        start += size

    broken = broken_records(seed)
    name, lines, size, _ = plan[-1]
    mixed: list[str] = []
    slots = len(broken) + 1
    # Spread the broken lines evenly through the valid ones, at fixed positions.
    cuts = [round(size * (k + 1) / slots) for k in range(len(broken))]
    previous = 0
    for k, bad in enumerate(broken):
        mixed.extend(lines[previous : cuts[k]])
        mixed.append(bad)
        previous = cuts[k]
    mixed.extend(lines[previous:])
    plan[-1] = (name, mixed, size, len(broken))
    return plan


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _write_plan(
    out_dir: str | pathlib.Path, n: int, seed: int, files: int
) -> list[tuple[pathlib.Path, int, int]]:
    folder = pathlib.Path(out_dir)
    plan = _plan(n, seed, files)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[pathlib.Path, int, int]] = []
    for name, lines, valid_count, broken_count in plan:
        path = folder / name
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        _atomic_write(path, data)
        written.append((path, valid_count, broken_count))
    return written


def write_demo_data(
    out_dir: str | pathlib.Path, n: int = 2400, seed: int = 0, files: int = 2
) -> list[pathlib.Path]:
    """Write ``n`` valid examples split across ``files`` JSONL files in ``out_dir``.

    With ``files=2`` the files are ``feedback-2026-10.jsonl`` and
    ``feedback-2026-11.jsonl``; otherwise ``feedback-part-01.jsonl`` and so on. The
    valid records are split as evenly as possible in generation order, and the lines
    from :func:`broken_records` are interleaved at fixed, evenly spaced positions in the
    last file only. Each file is UTF-8, one JSON object per line, written atomically
    (temporary file in the same folder, then ``os.replace``). The same arguments always
    produce byte-identical files. Returns the paths written, in order.
    """
    return [path for path, _, _ in _write_plan(out_dir, n, seed, files)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the demo files unless they already exist."""
    parser = argparse.ArgumentParser(
        prog="python -m loraflow.demo_data",
        description="Write seeded demo JSONL data for the customer-feedback triage fine-tune.",
    )
    parser.add_argument("out_dir", type=pathlib.Path, help="folder to write the JSONL files into")
    parser.add_argument("--n", type=int, default=2400, help="number of valid examples (default 2400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--files", type=int, default=2, help="number of files (default 2)")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be non-negative")
    if args.files < 1:
        parser.error("--files must be at least 1")

    targets = [args.out_dir / name for name in _file_names(args.files)]
    existing = [path for path in targets if path.exists()]
    if existing and not args.force:
        for path in existing:
            print(f"{path} already exists; leaving it (use --force to overwrite)")
        return 0

    for path, valid_count, broken_count in _write_plan(args.out_dir, args.n, args.seed, args.files):
        total = valid_count + broken_count
        print(f"{path}: {total} records ({valid_count} valid, {broken_count} broken)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
