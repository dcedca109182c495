"""Surface forms of a question by rule (model/question_forms.py): what each rule turns, and
what it must leave alone so that the fact's answer stays right."""

from __future__ import annotations

from model.question_forms import surface_forms


def test_the_possessive_is_turned_both_ways_first():
    forms = surface_forms("What is Ada Quill's country of citizenship?", "Ada Quill")
    assert forms[0] == "What is the country of citizenship of Ada Quill?"
    back = surface_forms("Who was the mother of Ada Quill?", "Ada Quill")
    assert back[0] == "Who was Ada Quill's mother?"
    assert surface_forms("Who was the mother of Louis?", "Louis")[0] == "Who was Louis' mother?"


def test_opening_word_tense_and_contraction():
    assert surface_forms("What city was Ada Quill born in?", "Ada Quill") == [
        "Which city was Ada Quill born in?"]
    assert surface_forms("Who was the mother of Ada Quill?", "Ada Quill")[1:] == [
        "Who is the mother of Ada Quill?"]
    assert "What is Ada Quill's career?" in surface_forms("What was Ada Quill's career?",
                                                         "Ada Quill")
    assert "What's the record label of Lost Days?" in surface_forms(
        "What is the record label of Lost Days?", "Lost Days")
    assert "What is the home city of Servite Order?" in surface_forms(
        "What’s the home city of Servite Order?", "Servite Order")


def test_questions_typed_in_lower_case_or_without_a_question_mark():
    assert surface_forms("what is ada quill's mother?", "ada quill") == [
        "what is the mother of ada quill?", "what's ada quill's mother?"]
    assert "which city was Ada Quill born in" in surface_forms(
        "what city was Ada Quill born in", "Ada Quill")
    assert surface_forms("Who is Ada Quill's mother", "Ada Quill")[0] == (
        "Who is the mother of Ada Quill?")


def test_no_rule_changes_what_is_asked():
    # The present asked in the past has other answers; a past event stays past.
    assert not any(" was " in f for f in surface_forms("Who is the president of France?",
                                                         "France"))
    assert surface_forms("Who was Ada Quill born to?", "Ada Quill") == []
    # Nothing inside the subject: a title with "is" in it keeps it.
    assert surface_forms("Who directed Paris is Burning?", "Paris is Burning") == []
    # "What" as a pronoun is not "Which"; an inner "of" is not where the possessive turns.
    assert surface_forms("What happened to Ada Quill?", "Ada Quill") == []
    assert surface_forms("What about Ada Quill?", "Ada Quill") == []
    assert surface_forms("What is the name of the father of Ada Quill?", "Ada Quill") == [
        "What's the name of the father of Ada Quill?"]
    assert surface_forms("What is the French word for cat?", "cat") == [
        "What's the French word for cat?"]


def test_no_form_repeats_the_question_or_another_form():
    question = "Who was the mother of Ada Quill?"
    forms = surface_forms(question, "Bob")  # a subject not in the question is not used
    assert "Who was Ada Quill's mother?" not in forms
    assert question not in forms and len(set(forms)) == len(forms)
    assert surface_forms("Tell me a joke.", None) == []
    assert surface_forms("What  is Ada  Quill's   mother's name?", "Ada  Quill")[0] == (
        "What is the mother's name of Ada Quill?")
