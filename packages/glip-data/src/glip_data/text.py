"""Offline noun-phrase extraction and phrase location in captions.

The official demo extracts the entities of a free caption with NLTK: ``word_tokenize`` + ``pos_tag`` and the chunk
grammar ``NP: {<DT>?<JJ.*>*<NN.*>+}`` (docs/official_model.md#caption-data). NLTK's tagger data cannot be
downloaded here, so this module implements the same grammar over a small rule-based tagger:

1. **Tokens** — words (letters/digits, with inner hyphens and apostrophes), the possessive ``'s`` as its own
   token, and single punctuation marks; each keeps its character offsets in the caption.
2. **Lexical tags** — closed-class word lists (determiners and possessive determiners, numerals and quantifiers,
   prepositions incl. ``in front of`` / ``on top of``, pronouns, conjunctions, auxiliaries, adverbs), a list of
   common adjectives (colours, sizes, materials, ...), a list of common caption verbs with their inflections, and
   suffix heuristics: ``-ing`` / ``-ed`` → participle, ``-ly`` → adverb, ``-ful``/``-ous``/``-less`` → adjective,
   each with a list of nouns that look like them (``building``, ``bed``, ``family``, ``handful``...). Every other
   word is a noun — open-class words in captions are mostly nouns.
3. **Context** — ambiguous words are resolved from their neighbours: a participle right after a determiner,
   adjective or numeral modifies a noun (``a sleeping cat``, ``a parked car``), otherwise it is a verb
   (``a man holding``); a verb-like word (``watch``, ``park``, ``stop``) after a determiner, adjective, numeral or
   preposition is a noun (``the park``), after a noun it is a noun when a noun, punctuation or the end follows
   (``a bus stop.``) and a verb otherwise (``people watch the game``).
4. **Chunks** — leftmost-longest matches of ``DET? MOD* NOUN+`` where MOD is an adjective, a modifying participle
   or a numeral; a run of modifiers with no noun after it is a phrase when its last word is an adjective that is
   also a noun (``her baby``, ``an adult``). Numerals are deliberately allowed as modifiers (``the two dogs``),
   which NLTK's grammar would cut to ``dogs``.

It is a heuristic: expect the occasional wrong chunk on unusual sentences. Pass explicit phrases to
:func:`find_phrase_spans` when you know them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]

# --- word lists ------------------------------------------------------------------------------------------------

_DETERMINERS = frozenset(
    "a an the this these those some any each every no another both all either neither my your his her its our "
    "their whose".split()
)
_NUMERALS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand dozen dozens "
    "several many few multiple numerous half".split()
)
_PREPOSITIONS = frozenset(
    "in on at of with by for from to into onto over under near behind beside besides between above below across "
    "along alongside around through next inside outside atop beneath underneath against toward towards upon "
    "during without within down up off out past about like via among amid amongst throughout beyond despite "
    "except per than".split()
)
_PRONOUNS = frozenset(
    "i you he she it we they me him us them myself yourself himself herself itself ourselves themselves who whom "
    "which what that there here someone something somebody anyone anything everyone everything everybody nobody "
    "nothing mine yours hers ours theirs one's".split()
)
_CONJUNCTIONS = frozenset("and or but nor so yet while as because if then when where whereas although though".split())
_AUXILIARIES = frozenset(
    "is are was were be been being am 's 're 'm has have had having do does did doing will would can could shall "
    "should may might must".split()
)
_ADVERBS = frozenset(
    "very too also just not n't really quite almost together away back overhead nearby around again still even "
    "only already soon now often always never sometimes maybe perhaps rather somewhat so up downstairs upstairs "
    "outdoors indoors apart alone instead else ahead aside".split()
)
_ADJECTIVES = frozenset(
    # colours
    "red orange yellow green blue purple violet pink brown black white gray grey silver gold golden beige tan "
    "maroon navy teal turquoise cyan magenta crimson blond blonde dark bright pale colorful colourful multicolored "
    "reddish bluish greenish yellowish brownish whitish grayish pinkish purplish "
    # size, shape, age
    "big small large little tall short long huge tiny giant enormous massive miniature wide narrow thin thick "
    "high low round flat square rectangular circular oval old young new elderly adult baby "
    # state, quality
    "empty full open closed busy clean dirty wet dry hot cold warm cool fresh ripe rotten raw sliced pretty "
    "beautiful cute happy sad angry funny silly lonely lovely ugly friendly curly fluffy furry hairy shiny sunny "
    "cloudy snowy rainy foggy grassy sandy rocky muddy dusty leafy lush wooden woolen broken frozen fallen hidden "
    "sunken stuffed striped spotted checkered plaid floral metallic electric digital public private modern "
    "ancient antique vintage old-fashioned fake real delicious tasty healthy professional outdoor indoor single "
    "double triple whole entire various different same other similar separate favorite favourite female male "
    "left right first second third fourth last main several daily early heavy light-colored dark-colored "
    "asleep awake alive upright sideways fancy plain simple decorative colored coloured".split()
)
# Adjectives that also serve as nouns: a phrase that ends on one of them has it as its head ("her baby",
# "an adult", "the square").
_NOUN_ADJECTIVES = frozenset("baby adult square female male elderly young".split())
# Nouns that the suffix heuristics would otherwise mistake for participles / adverbs / adjectives.
_NOUN_EXCEPTIONS = frozenset(
    "building buildings ceiling ceilings clothing king kings ring rings string strings thing things wing wings "
    "painting paintings evening morning swing swings spring springs sibling siblings pudding stuffing railing "
    "railings icing awning awnings frosting topping toppings earring earrings bedding wedding lightning sling "
    "offspring dumpling dumplings parking "
    "bed beds shed sled red seed speed weed hundred sacred bread "
    "family belly lily jelly bully ally rally holly butterfly dragonfly supply reply july italy fly firefly "
    "assembly anomaly doily "
    "handful mouthful spoonful cupful bowlful armful".split()
)
# Common caption verbs (base form); inflections are generated below. Many are also nouns; context decides.
_VERB_BASES = (
    "sit stand hold look walk ride play eat lay lie fly run wear carry watch wait sleep swim jump throw catch "
    "drink cross park hang rest talk smile pose read cut use show take make go come get see put stare climb graze "
    "surf skate ski kick hit pull push drive fill cover line lean face head display prepare cook serve sell fix "
    "paint feed pet hug kiss laugh cry dance sing stop turn move try help work wash brush open close contain sail "
    "float land perch sniff chase lick bite point reach rain snow grow fall stay keep leave enter exit appear seem "
    "become begin gather pass travel board load unload overlook approach swing hit fly lift drag shop sell buy "
    "hold decorate top stack slice pour place sit set cuddle photograph film film frame arrange").split()
_IRREGULAR_PAST = frozenset(
    "sat stood held ate eaten flew flown ran wore worn carried threw thrown caught drank drunk hung took taken "
    "made went gone came got gotten saw seen put lay lain fell grew grown rode ridden drove driven left kept sold "
    "fed cut hit began begun became swam swum built bought brought laid led lit met paid said sent shot slept "
    "spread struck swung taught told thought won wrote written".split()
)


def _inflections(base: str) -> tuple[set[str], set[str], set[str]]:
    """(3rd-person forms, -ing forms, regular past forms) of a base verb, by the usual spelling rules."""
    third = {base + "es"} if base.endswith(("s", "sh", "ch", "x", "z", "o")) else {base + "s"}
    if base.endswith("y") and len(base) > 2 and base[-2] not in "aeiou":
        third = {base[:-1] + "ies"}
    stem = base[:-1] if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) else base
    if base.endswith("ie"):
        stem = base[:-2] + "y"
    ing = {stem + "ing"}
    # Doubling for short consonant-vowel-consonant verbs (sit -> sitting, stop -> stopping).
    if len(base) >= 3 and base[-1] not in "aeiouwxy" and base[-2] in "aeiou" and base[-3] not in "aeiou":
        ing.add(base + base[-1] + "ing")
    past = {base + "d"} if base.endswith("e") else {base + "ed", base + base[-1] + "ed"}
    if base.endswith("y") and len(base) > 2 and base[-2] not in "aeiou":
        past = {base[:-1] + "ied"}
    return third, ing, past


_VERB_BASE_SET = frozenset(_VERB_BASES)
_VERB_THIRD: set[str] = set()
_VERB_ING: set[str] = set()
_VERB_PAST: set[str] = set(_IRREGULAR_PAST)
for _base in _VERB_BASES:
    _t, _i, _p = _inflections(_base)
    _VERB_THIRD |= _t
    _VERB_ING |= _i
    _VERB_PAST |= _p

# Tags
DET, NUM, ADJ, NOUN, VERB, ADV, PREP, PRON, CONJ, AUX, PUNCT, POS = (
    "DET", "NUM", "ADJ", "NOUN", "VERB", "ADV", "PREP", "PRON", "CONJ", "AUX", "PUNCT", "POS",
)
# Ambiguous lexical classes, resolved from context.
_V_BASE, _V_THIRD, _V_PART = "V_BASE", "V_THIRD", "V_PART"
_MODIFIER_CONTEXT = frozenset({DET, ADJ, NUM, POS})

_TOKEN = re.compile(
    r"(?P<pos>['’]s\b)"                                # possessive / contracted 's
    r"|(?P<word>[^\W_]+(?:-[^\W_]+)*(?:['’](?!s\b)[^\W_]+)?)"  # words, inner hyphens, don't
    r"|(?P<punct>[^\w\s]|_)"
)


@dataclass(frozen=True)
class _Token:
    text: str
    start: int
    end: int
    lex: str
    tag: str = ""


def _lexical_tag(word: str, prev_word: str | None, next_word: str | None) -> str:
    w = word.lower().replace("’", "'")
    if w in ("front", "top") and next_word == "of" and prev_word in ("in", "on"):
        return PREP  # "in front of", "on top of" are prepositions, not noun phrases
    if w.isdigit() or re.fullmatch(r"\d+(?:[.,]\d+)*(?:st|nd|rd|th)?", w):
        return NUM
    if w in _DETERMINERS:
        return DET
    if w in _NUMERALS:
        return NUM
    if w in _PREPOSITIONS:
        return PREP
    if w in _PRONOUNS:
        return PRON
    if w in _CONJUNCTIONS:
        return CONJ
    if w in _AUXILIARIES:
        return AUX
    if w in _ADVERBS:
        return ADV
    if w in _ADJECTIVES:
        return ADJ
    if w in _NOUN_EXCEPTIONS:
        return NOUN
    if w in _VERB_BASE_SET:
        return _V_BASE
    if w in _VERB_THIRD:
        return _V_THIRD
    if w in _VERB_ING or w in _VERB_PAST:
        return _V_PART
    if len(w) > 4 and w.endswith("ing"):
        return _V_PART
    if len(w) > 4 and w.endswith("ed") and not w.endswith("eed"):
        return _V_PART
    if len(w) > 4 and w.endswith("ly"):
        return ADV
    if len(w) > 5 and w.endswith(("ful", "ous", "less")):
        return ADJ
    return NOUN


def _tokenize(caption: str) -> list[_Token]:
    raw = [(m.group(), m.start(), m.end(), m.lastgroup) for m in _TOKEN.finditer(caption)]
    tokens = []
    for k, (text, start, end, kind) in enumerate(raw):
        if kind == "punct":
            lex = PUNCT
        elif kind == "pos":
            lex = POS
        else:
            prev_word = raw[k - 1][0].lower() if k > 0 else None
            next_word = raw[k + 1][0].lower() if k + 1 < len(raw) else None
            lex = _lexical_tag(text, prev_word, next_word)
        tokens.append(_Token(text, start, end, lex))
    return tokens


def _resolve(tokens: list[_Token]) -> list[_Token]:
    """Give every ambiguous token a final tag from its resolved left neighbour and its lexical right neighbour."""
    out: list[_Token] = []
    for k, tok in enumerate(tokens):
        prev = out[-1] if out else None
        prev_tag = prev.tag if prev else None
        next_lex = tokens[k + 1].lex if k + 1 < len(tokens) else None
        after_infinitive_to = prev is not None and prev.text.lower() == "to"
        tag = tok.lex
        if tok.lex == _V_PART:
            tag = ADJ if prev_tag in _MODIFIER_CONTEXT else VERB
        elif tok.lex in (_V_BASE, _V_THIRD):
            if tok.lex == _V_THIRD and prev is not None and prev.text.lower() in _NOUN_ADJECTIVES and next_lex != NOUN:
                tag = VERB  # the adjective is the subject's head: "an adult watches", "the baby sleeps on"
            elif prev_tag is None or prev_tag in _MODIFIER_CONTEXT:
                tag = NOUN
            elif prev_tag == PREP and not after_infinitive_to:
                tag = NOUN
            elif prev_tag == NOUN and tok.lex == _V_BASE and next_lex in (NOUN, PUNCT, CONJ, None):
                tag = NOUN  # compound noun: "a bus stop.", "a ski lift and ..."
            elif prev_tag == NOUN and prev.lex == _V_BASE and tok.lex == _V_BASE:
                # two base forms in a row: the first is already a noun, and a singular noun cannot be the subject
                # of a bare base verb, so this one continues the compound ("a surf board on", "the ski lift to")
                tag = NOUN
            else:
                tag = VERB
        out.append(_Token(tok.text, tok.start, tok.end, tok.lex, tag))
    return out


def _chunks(tokens: list[_Token]) -> list[tuple[int, int]]:
    """Leftmost-longest ``DET? MOD* NOUN+`` matches, as (first token, last token) index pairs."""
    found = []
    i = 0
    while i < len(tokens):
        j = i
        if tokens[j].tag == DET:
            j += 1
        while j < len(tokens) and tokens[j].tag in (ADJ, NUM):
            j += 1
        k = j
        while k < len(tokens) and tokens[k].tag == NOUN:
            k += 1
        if k == j and j > i and tokens[j - 1].text.lower() in _NOUN_ADJECTIVES:
            found.append((i, j - 1))  # the last modifier is the head: "her baby", "an adult"
            i = j
        elif k > j:
            found.append((i, k - 1))
            i = k
        else:
            i += 1
    return found


def find_noun_phrases(caption: str) -> list[str]:
    """Extract the noun phrases of a caption (offline, rule-based; see the module docstring for the rules).

    Returns the phrases as they are written in the caption (case kept), in order of first appearance, without
    duplicates (compared case-insensitively), e.g. ``"a man holding a red umbrella next to the two dogs"`` →
    ``["a man", "a red umbrella", "the two dogs"]``.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    tokens = _resolve(_tokenize(caption))
    phrases: list[str] = []
    seen: set[str] = set()
    for first, last in _chunks(tokens):
        phrase = caption[tokens[first].start : tokens[last].end]
        key = phrase.lower()
        if key not in seen:
            seen.add(key)
            phrases.append(phrase)
    return phrases


def find_phrase_spans(
    caption: str, phrases: Sequence[str | Sequence[str]], *, ignore_case: bool = True
) -> list[list[Span]]:
    """Locate phrases in a caption: the ``tokens_positive`` of each.

    A phrase given as a string is found at its first occurrence (a plain substring match, as the official demo's
    "span" semantics: ``"a man"`` also matches inside ``"a mango"``; pass a more specific phrase if that matters).
    A phrase given as a list of fragments (ODVG's phrases, e.g. ``["red", "mug"]`` for "red ceramic mug") gets one
    span per fragment, each fragment searched from the end of the previous one. Every phrase is searched from the
    start of the caption, independently of the others.

    Args:
        caption: the text.
        phrases: one entry per entity: a string, or a list of string fragments.
        ignore_case: match case-insensitively (the demo's behaviour); ODVG files are searched case-sensitively.

    Returns:
        ``spans[i]``: the ``(start, end)`` spans (end exclusive) of phrase ``i`` — one for a string, one per fragment
        for a list.

    Raises:
        TypeError: ``caption`` is not a string, ``phrases`` is a single string, or a phrase is neither a string nor
            a list of strings.
        ValueError: a phrase or fragment is empty (or only spaces), a fragment list is empty, or a phrase does not
            occur in the caption (the phrase and the caption are named).
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if isinstance(phrases, str):
        raise TypeError(f"phrases must be a list of strings, got the single string {phrases!r}")
    flags = re.IGNORECASE if ignore_case else 0
    spans: list[list[Span]] = []
    for i, phrase in enumerate(phrases):
        fragments = [phrase] if isinstance(phrase, str) else phrase
        if not isinstance(fragments, (list, tuple)) or not all(isinstance(f, str) for f in fragments):
            raise TypeError(f"phrases[{i}] must be a str or a list of str fragments, got {type(phrase).__name__}: "
                            f"{phrase!r}")
        if not fragments or not all(f.strip() for f in fragments):
            raise ValueError(f"phrases[{i}] is empty: {phrase!r}")
        found: list[Span] = []
        cursor = 0
        for fragment in fragments:
            # re keeps offsets of the original caption under IGNORECASE (str.lower() can change lengths)
            match = re.compile(re.escape(fragment), flags).search(caption, cursor)
            if match is None:
                raise ValueError(f"phrase {i} ({phrase!r}) does not occur in the caption {caption!r}")
            found.append((match.start(), match.end()))
            cursor = match.end()
        spans.append(found)
    return spans
