"""Concept composition (the notebook's first example): an image plus a style prompt ending in [RET]; FROMAGe
retrieves 3 images of what the picture shows, in that style. The object is never named in the text."""
import common

NOTEBOOK_PROMPTS = ["watercolor drawing [RET]", "vector icon [RET]"]
# The miniworld has shapes, not styles of art: its own captions' object-free phrases.
MINIWORLD_PROMPTS = ["a drawing of [RET]", "on a grey background [RET]"]


def main() -> int:
    example = common.load(common.parse_args(__doc__, image=True), NOTEBOOK_PROMPTS, MINIWORLD_PROMPTS)
    for text in example.prompts:
        prompt = [example.image, text]
        print("Prompt:")
        example.show(prompt)
        print("=" * 30)
        # num_words=0: no text is generated, the [RET] of the prompt itself is the query.
        outputs = example.model.generate_for_images_and_texts(prompt, max_img_per_ret=3)
        print("Model generated outputs:")
        example.show(outputs)
    return 0


if __name__ == "__main__":
    common.run(main)
